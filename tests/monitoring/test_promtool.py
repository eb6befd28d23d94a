"""The Prometheus files pass promtool: config and rules are valid, the alert unit tests pass."""

from __future__ import annotations

import subprocess

import pytest

from tests.fixtures.procs import require_binary
from tests.monitoring.promql import MONITORING

PROMETHEUS = MONITORING / "prometheus"


@pytest.mark.parametrize(
    "args",
    [["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"], ["test", "rules", "rules_test.yml"]],
    ids=lambda a: " ".join(a[:2]),
)
def test_promtool(args: list[str]) -> None:
    done = subprocess.run([require_binary("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr
