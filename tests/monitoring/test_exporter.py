"""The metrics port: /metrics in the Prometheus text format, /healthz and /readyz from callables."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.wire import REASONS
from monitoring.exporter import Exporter
from monitoring.metrics import Metrics
from stream_cl.run import RUN_REASONS
from tests.fixtures.procs import require_binary


def get(exporter: Exporter, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}{path}", timeout=5) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_metrics_and_probes() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.samples.labels(outcome="learned").inc(7)
    ready = {"now": False}

    def broken() -> bool:
        raise RuntimeError("probe failed")

    with metrics.serve(0, ready=lambda: ready["now"], healthy=broken) as exporter:
        status, content_type, body = get(exporter, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert b'streamcl_samples_total{outcome="learned"} 7.0' in body
        assert get(exporter, "/readyz")[0] == 503
        ready["now"] = True
        assert get(exporter, "/readyz")[:1] == (200,) and get(exporter, "/readyz")[2] == b"ok\n"
        assert get(exporter, "/healthz")[0] == 503  # a probe that raises is unhealthy, the server lives on
        assert get(exporter, "/metrics")[0] == 200
        assert get(exporter, "/nope")[0] == 404
        port = exporter.port
    with Exporter(CollectorRegistry(), port) as again:  # stop() released the port
        assert get(again, "/healthz")[0] == 200


def test_bad_port() -> None:
    with pytest.raises(ValueError, match="port"):
        Exporter(CollectorRegistry(), 70000)


def test_promtool_check_metrics_is_clean() -> None:
    """``curl /metrics | promtool check metrics`` on the full contract with every kind of series populated."""
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)
    metrics.model_info.info({"method": "er", "model": "mlp", "device": "cpu"})
    for metric in vars(metrics).values():  # one series in every family, whatever its labels
        if isinstance(metric, Counter | Gauge | Histogram):
            child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
            (child.observe if isinstance(metric, Histogram) else child.inc)(1)
    with metrics.serve(0) as exporter:
        body = get(exporter, "/metrics")[2]
    done = subprocess.run([require_binary("promtool"), "check", "metrics"], input=body, capture_output=True)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done
