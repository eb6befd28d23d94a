"""Alert rules: every alert links a runbook that exists in the README and has a ``promtool`` unit test that fires it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.monitoring.promql import MONITORING

README = Path(__file__).resolve().parents[2] / "README.md"
RULES = yaml.safe_load((MONITORING / "prometheus" / "rules.yml").read_text())
UNIT_TESTS = yaml.safe_load((MONITORING / "prometheus" / "rules_test.yml").read_text())["tests"]
ALERTS = {r["alert"]: r for group in RULES["groups"] for r in group["rules"] if "alert" in r}


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def readme_anchors() -> set[str]:
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", README.read_text(), flags=re.MULTILINE)}


def test_the_operator_alerts_exist() -> None:
    expected = {
        "StreamClBufferErrors",
        "StreamClNonFiniteLoss",
        "StreamClDeadLetterSinkDown",
        "StreamClNoSamplesLearned",
    }
    assert expected <= set(ALERTS)
    assert 'reason=~"non_finite_loss|extreme_input"' in ALERTS["StreamClNonFiniteLoss"]["expr"]
    assert "streamcl_consumer_lag" in ALERTS["StreamClNoSamplesLearned"]["expr"]


def test_every_alert_links_a_runbook_heading_of_the_readme() -> None:
    anchors = readme_anchors()
    assert "monitoring" in anchors
    for name, rule in ALERTS.items():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "README.md" and anchor == name.lower(), f"{name}: runbook_url {url!r}"
        assert anchor in anchors, f"{name}: README.md has no heading with anchor #{anchor}"


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    cases = [case for test in UNIT_TESTS for case in test["alert_rule_test"]]
    for name in ALERTS:
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == name]
        assert True in outcomes and False in outcomes, f"{name}: needs a firing and a quiet case in rules_test.yml"


def test_no_samples_learned_has_an_idle_topic_case() -> None:
    """An idle topic (lag 0 throughout, learned counter flat) must be tested as quiet, long after the `for`."""
    idle = [
        test
        for test in UNIT_TESTS
        if any(
            s["series"].startswith("streamcl_consumer_lag") and s["values"].startswith("0x")
            for s in test["input_series"]
        )
        and all(c["alertname"] == "StreamClNoSamplesLearned" and not c["exp_alerts"] for c in test["alert_rule_test"])
    ]
    assert idle, "rules_test.yml lacks the idle-topic case of StreamClNoSamplesLearned"
