"""The metrics contract beyond the learner's own series: process and build info, no ``_created`` noise,
checkpoint age only when asked for, dead-letter spool and sink gauges, and a scrape ``promtool`` accepts."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from monitoring.metrics import Metrics, package_version
from tests.fixtures.procs import require_binary

RUN = Path(__file__).resolve().parents[2] / "stream_cl" / "run.py"


def scrape(metrics: Metrics) -> str:
    with metrics.serve(0) as exporter, urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics") as answer:
        return answer.read().decode()


def test_process_platform_and_gc_collectors_are_on_the_registry() -> None:
    metrics = Metrics(CollectorRegistry())
    assert metrics.registry.get_sample_value("process_resident_memory_bytes") > 0
    assert metrics.registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
    assert any(f.name == "python_info" for f in metrics.registry.collect())


def test_every_outcome_the_run_loop_counts_exists_at_zero_from_the_start() -> None:
    """A series that appears with its first increment loses that increment to rate() and increase()."""
    counted = set(re.findall(r'(?:outcomes|samples)\.labels\(outcome="(\w+)"\)', RUN.read_text()))
    assert {"learned", "predicted", "held_out", "dead_letter", "overload_skipped"} <= counted
    metrics = Metrics(CollectorRegistry())
    for outcome in counted:
        assert metrics.registry.get_sample_value("streamcl_samples_total", {"outcome": outcome}) == 0, outcome
    assert 'streamcl_samples_total{outcome="overload_skipped"} 0.0' in scrape(metrics)


def test_describe_publishes_model_and_build_info() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.describe(method="er", model="mlp", device="cpu")
    build = {"version": package_version(), "method": "er", "model": "mlp"}
    assert metrics.registry.get_sample_value("streamcl_build_info", build) == 1.0
    model = {"method": "er", "model": "mlp", "device": "cpu"}
    assert metrics.registry.get_sample_value("streamcl_model_info", model) == 1.0
    assert package_version() != ""


def test_scrape_has_no_created_series_but_the_registry_keeps_them() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.samples.labels(outcome="learned").inc()
    metrics.learn_step.observe(0.01)
    body = scrape(metrics)
    assert 'streamcl_samples_total{outcome="learned"} 1.0' in body and "streamcl_learn_step_seconds_count" in body
    assert "_created" not in body
    assert metrics.registry.get_sample_value("streamcl_samples_created", {"outcome": "learned"}) is not None


def test_checkpoint_age_exists_only_once_used() -> None:
    metrics = Metrics(CollectorRegistry())
    assert "streamcl_checkpoint_age_seconds" not in scrape(metrics)
    metrics.checkpoint_age.set_function(lambda: 12.5)
    assert metrics.checkpoint_age is metrics.checkpoint_age  # registered once, however often it is used
    assert "streamcl_checkpoint_age_seconds 12.5" in scrape(metrics)


def test_dead_letter_spool_and_sink_gauges_exist_only_once_used() -> None:
    metrics = Metrics(CollectorRegistry())
    assert "streamcl_dead_letter_s" not in scrape(metrics)  # no sink: nothing to alert on
    metrics.dead_letter_spool.set(17)
    metrics.dead_letter_sink_up.set(0)
    metrics.dead_letter_spool.inc()
    body = scrape(metrics)
    assert "streamcl_dead_letter_spool_records 18.0" in body and "streamcl_dead_letter_sink_up 0.0" in body


def test_promtool_accepts_a_scrape_of_a_populated_registry() -> None:
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=("bad_json", "non_finite_loss"))
    metrics.describe(method="er", model="mlp", device="cpu")
    metrics.samples.labels(outcome="learned").inc(5)
    metrics.dead_letters.labels(reason="non_finite_loss").inc()
    metrics.buffer_errors.inc()
    metrics.dead_letter_spool.set(3)
    metrics.dead_letter_sink_up.set(1)
    metrics.checkpoint_age.set(4)
    metrics.learn_step.observe(0.002)
    metrics.consumer_lag.labels(topic="t", partition="0").set(9)
    body = scrape(metrics)
    assert "process_resident_memory_bytes" in body and "streamcl_build_info{" in body
    done = subprocess.run([require_binary("promtool"), "check", "metrics"], input=body.encode(), capture_output=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done
