"""Drift detection: river's detectors fire after a known abrupt change and never before it."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource
from monitoring.drift import DEFAULT_DRIFT, DriftMonitor, DriftSpec, parse_drift
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.errors import StreamClError
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.monitoring.streams import permuted_labels_stream

CHANGE = 1500
BOUND = 200  # ADWIN and Page-Hinkley must fire within this many records of the change


@pytest.fixture(scope="module")
def permuted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return permuted_labels_stream(tmp_path_factory.mktemp("drift") / "permuted.rec.gz", n_before=CHANGE, n_after=1000)


def run(path: Path, drift: str) -> tuple[list[dict], Metrics]:
    metrics = Metrics(CollectorRegistry())
    monitor = DriftMonitor(parse_drift(drift), metrics, seed=0)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0)
    with RecordedSource(path) as source:
        summary, _ = run_stream(source, make, metrics, RunOptions(progress=False), RunParts(ProbeSet(), drift=monitor))
    return summary.drift_events, metrics


def test_detectors_fire_after_the_change_not_before(permuted: Path) -> None:
    events, metrics = run(permuted, DEFAULT_DRIFT)
    assert events, "no drift detected"
    assert all(e["position"] >= CHANGE for e in events), events  # no false alarm while learning the first concept
    for detector, signal in (("adwin", "error"), ("page-hinkley", "loss")):
        first = min(e["position"] for e in events if (e["detector"], e["signal"]) == (detector, signal))
        assert first < CHANGE + BOUND, (detector, first)
    for detector, signal in (("adwin", "error"), ("page-hinkley", "loss"), ("adwin", "uncertainty")):
        count = sum((e["detector"], e["signal"]) == (detector, signal) for e in events)
        labels = {"detector": detector, "signal": signal}
        assert metrics.registry.get_sample_value("streamcl_drift_detected_total", labels) == count
        assert metrics.registry.get_sample_value("streamcl_drift_statistic", labels) is not None
    assert set(events[0]) == {"detector", "signal", "position"}
    assert events == sorted(events, key=lambda e: e["position"])


def test_counter_is_zero_up_to_the_change_and_rises_within_the_bound(permuted: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    monitor = DriftMonitor(parse_drift(DEFAULT_DRIFT), metrics, seed=0)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0)

    def detections() -> dict[str, float]:
        return {w.spec.signal: metrics.registry.get_sample_value(
            "streamcl_drift_detected_total", {"detector": w.spec.detector, "signal": w.spec.signal}
        ) for w in monitor.watches}  # fmt: skip

    with RecordedSource(permuted) as source:
        _, state = run_stream(
            source, make, metrics, RunOptions(progress=False, max_records=CHANGE), RunParts(ProbeSet(), drift=monitor)
        )
        assert detections() == {"error": 0.0, "loss": 0.0, "uncertainty": 0.0}
        options = RunOptions(progress=False, max_records=BOUND)
        run_stream(source, make, metrics, options, RunParts(ProbeSet(), drift=monitor), state=state)
    after = detections()
    assert after["error"] >= 1 and after["loss"] >= 1, after


def test_kswin_on_batch_means_raises_no_false_alarm(permuted: Path) -> None:
    events, metrics = run(permuted, "kswin:uncertainty")
    assert all(e["position"] >= CHANGE for e in events), events
    labels = {"detector": "kswin", "signal": "uncertainty"}
    assert metrics.registry.get_sample_value("streamcl_drift_detected_total", labels) == len(events)
    assert 0 < metrics.registry.get_sample_value("streamcl_drift_statistic", labels) < 1


def test_deterministic(permuted: Path) -> None:
    assert run(permuted, "adwin:error")[0] == run(permuted, "adwin:error")[0]


def cli(argv: list[str]) -> int:
    """``stream-cl run`` (without ``stream_cl.cli``, which imports every command and their clients)."""
    from stream_cl.commands import run as run_command  # imported here: it pulls in the Kafka client

    parser = argparse.ArgumentParser()
    run_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_flags_and_summary(permuted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "summary.json"
    args = ["run", "--source", str(permuted), "--metrics-port", "0", "--no-progress", "--summary-json", str(out)]
    assert cli([*args, "--drift", "adwin:error:delta=0.002"]) == 0
    events = json.loads(out.read_text())["drift_events"]
    assert events and {e["detector"] for e in events} == {"adwin"} and events[0]["position"] >= CHANGE
    logged = [r.drift for r in caplog.records if hasattr(r, "drift")]  # the structured log events
    assert logged == events
    assert cli([*args, "--no-drift"]) == 0
    assert json.loads(out.read_text())["drift_events"] == []
    with pytest.raises(StreamClError, match="--drift: unknown drift signal"):
        cli([*args, "--drift", "adwin:nonsense"])


def test_direction_filter_and_hook() -> None:
    """A falling error (a learner getting better) is no alarm with direction=up; both counts it."""
    improving = np.r_[np.ones(500), np.zeros(1500)]
    positions = np.arange(len(improving))
    assert DriftMonitor(parse_drift("adwin:error")).update("error", improving, positions) == []
    seen = []
    monitor = DriftMonitor(parse_drift("adwin:error:direction=both"), hook=seen.append)
    events = monitor.update("error", improving, positions)
    assert events and seen == events and events[0].position >= 500


def test_stationary_signal_raises_nothing() -> None:
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(parse_drift(DEFAULT_DRIFT))
    for start in range(0, 5000, 10):
        positions = np.arange(start, start + 10)
        monitor.update("error", rng.random(10) < 0.2, positions)
        monitor.update("loss", rng.normal(0.5, 0.05, 1), positions[-1:])
        monitor.update("uncertainty", rng.uniform(0, 0.3, 10), positions)
    assert monitor.events == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ddm:error", "unknown drift detector"),
        ("adwin:speed", "unknown drift signal"),
        ("adwin:error:delta", "name=value"),
        ("adwin:error:nope=1", "bad parameters"),
        ("adwin:error:feed=sometimes", "feed"),
        ("adwin:error,adwin:error", "once"),
    ],
)
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftMonitor(parse_drift(text))


def test_spec_parsing() -> None:
    assert DriftSpec.parse("kswin:uncertainty:alpha=0.001:window_size=50") == DriftSpec(
        "kswin", "uncertainty", {"alpha": 0.001, "window_size": 50}
    )
    assert parse_drift("") == []


def test_events_do_not_depend_on_how_values_are_batched() -> None:
    """A detector takes one value per update whatever the batch; the direction filter must agree too."""
    rng = np.random.default_rng(3)
    signal = np.r_[rng.random(800) < 0.1, rng.random(800) < 0.6, rng.random(800) < 0.05].astype(float)
    positions = np.arange(len(signal))

    def events(batch: int, direction: str) -> list[tuple[int, float]]:
        monitor = DriftMonitor(parse_drift(f"adwin:error:direction={direction}"))
        found = []
        for start in range(0, len(signal), batch):
            found += monitor.update("error", signal[start : start + batch], positions[start : start + batch])
        return [(e.position, e.value) for e in found]

    for direction in ("up", "both"):
        one_by_one = events(1, direction)
        assert one_by_one and events(10, direction) == one_by_one == events(64, direction)
    assert len(events(1, "up")) < len(events(1, "both"))  # the falling error at the end is filtered out
