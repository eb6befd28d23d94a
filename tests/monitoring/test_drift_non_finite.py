"""A NaN or infinite signal value never reaches a drift detector: one would stay in its running sums and it would
never detect again (an unlabelled record of huge but finite floats gives a NaN softmax confidence)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.record import Message, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.wire import encode_binary
from monitoring.drift import DriftMonitor, parse_drift
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.monitoring.streams import DIM, blobs

CHANGE = 1500
UNLABELLED = 700  # offset of the one unlabelled record, well before the change
HUGE = np.full(DIM, 3e38, dtype=np.float32)  # finite float32, but its logits overflow: softmax gives NaN


def stream(path: Path, unlabelled_x: np.ndarray) -> Path:
    """4 i.i.d. classes whose labels shift by one at ``CHANGE``; the record at ``UNLABELLED`` has no label."""
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, size=CHANGE + 1000)
    shown = np.where(np.arange(len(true)) < CHANGE, true, (true + 1) % 4)
    x = blobs(true, seed=0)
    x[UNLABELLED] = unlabelled_x
    messages = []
    for i, (xi, yi) in enumerate(zip(x, shown, strict=True)):
        value, headers = encode_binary(f"t-{i}", xi, None if i == UNLABELLED else f"c{yi}")
        messages.append(Message(Position("t", 0, i), float(i), None, value, tuple(headers)))
    write_messages(path, messages)
    return path


def run(path: Path) -> tuple[list[dict], Metrics]:
    metrics = Metrics(CollectorRegistry())
    monitor = DriftMonitor(parse_drift("adwin:uncertainty"), metrics)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0)
    with RecordedSource(path) as source:
        summary, _ = run_stream(source, make, metrics, RunOptions(progress=False), RunParts(drift=monitor))
    assert summary.dead_letter == {}  # the huge record is predicted, not refused: it reaches the drift signal
    return summary.drift_events, metrics


def test_an_unlabelled_record_of_huge_floats_does_not_stop_uncertainty_drift_detection(tmp_path: Path) -> None:
    ordinary = blobs(np.array([0]), seed=1)[0]  # the same stream with an ordinary unlabelled record there
    clean_events, clean = run(stream(tmp_path / "clean.rec.gz", ordinary))
    poisoned_events, poisoned = run(stream(tmp_path / "poisoned.rec.gz", HUGE))
    assert clean_events and all(e["position"] >= CHANGE for e in clean_events), clean_events
    assert poisoned_events, "drift on uncertainty was never detected after the huge record"
    assert abs(poisoned_events[0]["position"] - clean_events[0]["position"]) <= 10, (poisoned_events, clean_events)
    labels = {"detector": "adwin", "signal": "uncertainty"}
    assert math.isfinite(poisoned.registry.get_sample_value("streamcl_drift_statistic", labels))
    left_out = "streamcl_drift_non_finite_values_total"
    assert clean.registry.get_sample_value(left_out, {"signal": "uncertainty"}) == 0
    assert poisoned.registry.get_sample_value(left_out, {"signal": "uncertainty"}) == 1


@pytest.mark.parametrize("spec", ["adwin:uncertainty", "page-hinkley:uncertainty", "kswin:uncertainty"])
def test_non_finite_values_are_left_out_and_counted(spec: str) -> None:
    """Every detector, in both feed modes (KSWIN takes batch means), sees exactly the finite values."""
    rng = np.random.default_rng(0)
    signal = np.r_[rng.uniform(0, 0.3, 1500), rng.uniform(0.5, 0.9, 1000)]
    signal[[503, 707, 708]] = [np.nan, np.inf, -np.inf]
    positions = np.arange(len(signal))
    detector, _ = spec.split(":")
    labels = {"detector": detector, "signal": "uncertainty"}
    clean = DriftMonitor(parse_drift(spec))
    poisoned = DriftMonitor(parse_drift(spec), metrics := Metrics(CollectorRegistry()))
    for start in range(0, len(signal), 10):
        values, where = signal[start : start + 10], positions[start : start + 10]
        finite = np.isfinite(values)
        clean.update("uncertainty", values[finite], where[finite])
        poisoned.update("uncertainty", values, where)
        assert math.isfinite(metrics.registry.get_sample_value("streamcl_drift_statistic", labels))
    assert clean.events and poisoned.events == clean.events
    assert metrics.registry.get_sample_value("streamcl_drift_non_finite_values_total", {"signal": "uncertainty"}) == 3
    assert metrics.registry.get_sample_value("streamcl_drift_non_finite_values_total", {"signal": "error"}) is None


def test_a_batch_of_only_non_finite_values_feeds_nothing() -> None:
    metrics = Metrics(CollectorRegistry())
    monitor = DriftMonitor(parse_drift("adwin:loss"), metrics)
    assert monitor.update("loss", np.array([np.nan]), np.array([4])) == []
    assert len(monitor.watches[0].recent) == 0  # nothing was fed
    assert (
        metrics.registry.get_sample_value("streamcl_drift_statistic", {"detector": "adwin", "signal": "loss"}) is None
    )
    assert metrics.registry.get_sample_value("streamcl_drift_non_finite_values_total", {"signal": "loss"}) == 1
