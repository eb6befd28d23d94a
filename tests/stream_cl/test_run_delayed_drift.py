"""Drift detection with delayed labels: the error and loss detectors watch the samples learned when their labels
join (scored by the predictions made on arrival), and the uncertainty detector sees each sample once, on arrival."""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from consumers.record import DeadLetter, Message, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.wire import encode_binary
from monitoring.drift import DEFAULT_DRIFT, DriftMonitor, parse_drift
from monitoring.labeljoin import JoinMetrics
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.delayed import DelayedLabels
from stream_cl.pending import MemoryPending
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.monitoring.streams import blobs
from tests.stream_cl.test_delayed import Labels

CHANGE = 1500
AFTER = 1000
BOUND = 200  # as without delayed labels (tests/monitoring/test_drift.py): detected within this many records


class LabelFeed(Labels):
    """A label topic holding every label message from the start: labels wait for their features, then join."""

    def commit(self, offsets: dict) -> None:
        pass


class NoDeadLetters:
    backpressure = False

    def send(self, dead: DeadLetter) -> None:
        raise AssertionError(f"unexpected dead letter {dead.reason}: {dead.detail}")


def _abrupt_concept_change(path: Path) -> tuple[Path, LabelFeed]:
    """Unlabelled features ``f<i>`` at event time i; their labels (0.5 s later) shift by one class from ``CHANGE``."""
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, size=CHANGE + AFTER)
    shown = true.copy()
    shown[CHANGE:] = (true[CHANGE:] + 1) % 4
    messages = []
    for i, x in enumerate(blobs(true, seed=0)):
        value, headers = encode_binary(f"f{i}", x, None)
        messages.append(Message(Position("features", 0, i), float(i), None, value, tuple(headers)))
    write_messages(path, messages)
    feed = LabelFeed()
    for i, y in enumerate(shown):
        feed.send(f"f{i}", f"c{y}", i + 0.5)
    return path, feed


def test_error_and_loss_detectors_see_joined_samples_and_fire_after_the_change(tmp_path: Path) -> None:
    stream, feed = _abrupt_concept_change(tmp_path / "features.rec.gz")
    metrics = Metrics(CollectorRegistry())
    monitor = DriftMonitor(parse_drift(DEFAULT_DRIFT), metrics, seed=0)
    fed: Counter[str] = Counter()
    update = monitor.update

    def counted(signal: str, values: np.ndarray, positions: np.ndarray) -> list:
        fed[signal] += len(values)
        return update(signal, values, positions)

    monitor.update = counted
    store = MemoryPending(ttl_s=1e6, max_pending=10 * (CHANGE + AFTER))
    labels = DelayedLabels(feed, NoDeadLetters(), store=store, metrics=JoinMetrics(metrics.registry))
    labels.restore(None)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0)
    with RecordedSource(stream) as source:
        summary, _ = run_stream(
            source, make, metrics, RunOptions(progress=False), RunParts(drift=monitor, labels=labels)
        )

    n = CHANGE + AFTER
    assert (summary.labels_joined, summary.learned) == (n, n)
    assert fed["error"] == n  # one bit per joined sample
    assert 0 < fed["uncertainty"] <= n  # on arrival only (not before the first class), never again at the join
    events = summary.drift_events
    for detector, signal in (("adwin", "error"), ("page-hinkley", "loss")):
        found = [e["position"] for e in events if (e["detector"], e["signal"]) == (detector, signal)]
        assert found and CHANGE <= min(found) < CHANGE + BOUND, (signal, found)
        series = {"detector": detector, "signal": signal}
        assert metrics.registry.get_sample_value("streamcl_drift_detected_total", series) == len(found)
    assert all(e["position"] >= CHANGE for e in events), events  # no false alarm while learning the first concept
