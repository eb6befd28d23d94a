"""Polls of several batches: each batch holds the records of its own messages, bad ones are dead letters,
and the run's outcome does not depend on how many batches a poll takes."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from consumers.record import Message, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.wire import encode_binary
from monitoring.drift import DriftMonitor, parse_drift
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.learner import Batch, Learner, Observation
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.streams import blob_arrays


class _Recording:
    """A learner that notes the ids of every batch it is given (by their inputs' first value)."""

    def __init__(self, inner: Learner, batches: list[list[float]]) -> None:
        self.inner, self.batches = inner, batches
        self.name, self.labels, self.buffer = inner.name, inner.labels, inner.buffer

    def observe(self, batch: Batch) -> Observation:
        self.batches.append(batch.x[:, 0].tolist())
        return self.inner.observe(batch)

    def predict(self, x: torch.Tensor):
        return self.inner.predict(x)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)


def _stream(path: Path, bad: set[int], n: int = 95) -> Path:
    x, y = blob_arrays(n_classes=3, per_class=40, seed=2)
    messages = []
    for offset in range(n):
        row = x[offset].copy()
        row[0] = offset  # the record's offset, to read the batches back
        if offset in bad:
            value, headers = b"\xff not a record", ()
        else:
            value, headers = encode_binary(f"s{offset}", row, f"c{int(y[offset])}")
        messages.append(Message(Position("s", 0, offset), float(offset), None, value, tuple(headers)))
    write_messages(path, messages)
    return path


def _run(path: Path, poll_batches: int, drift: bool = False):
    batches: list[list[float]] = []
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=16)
    metrics = Metrics(CollectorRegistry())
    parts = RunParts(
        drift=DriftMonitor(parse_drift("adwin:error,page-hinkley:loss,kswin:uncertainty")) if drift else None
    )
    options = RunOptions(batch_size=10, poll_batches=poll_batches, progress=False)
    with RecordedSource(path) as source:
        summary, state = run_stream(source, lambda s, d: _Recording(make(s, d), batches), metrics, options, parts)
    return summary, state, batches, source.committed


def test_a_bad_message_mid_poll_is_a_dead_letter_and_its_batch_keeps_its_own_messages(tmp_path: Path) -> None:
    path = _stream(tmp_path / "s.rec.gz", bad={13, 47})
    summary, _, batches, committed = _run(path, poll_batches=10)
    assert summary.dead_letter == {"undecodable": 2} and summary.learned == 93 and summary.consumed == 95
    expected = [[float(o) for o in range(b, min(b + 10, 95)) if o not in (13, 47)] for b in range(0, 95, 10)]
    assert batches == expected  # the records of messages 10..19 but 13 make one batch, not ten good records
    assert committed == {("s", 0): 95}


def test_polling_many_batches_at_once_learns_what_one_batch_a_poll_learns(tmp_path: Path) -> None:
    path = _stream(tmp_path / "s.rec.gz", bad={13, 47})
    one, one_state, one_batches, _ = _run(path, poll_batches=1, drift=True)
    many, many_state, many_batches, _ = _run(path, poll_batches=10, drift=True)
    assert many_batches == one_batches
    assert (many.learned, many.dead_letter, many.online_accuracy) == (one.learned, one.dead_letter, one.online_accuracy)
    assert many.drift_events == one.drift_events
    for name, tensor in one_state.learner.inner.model.state_dict().items():
        assert torch.equal(tensor, many_state.learner.inner.model.state_dict()[name]), name


def test_drift_fed_several_batches_at_once_detects_what_batch_by_batch_detects() -> None:
    rng = np.random.default_rng(0)
    values = np.r_[rng.random(600) * 0.2, 0.6 + rng.random(400) * 0.4]  # the level jumps at 600
    positions = np.arange(len(values))
    specs = parse_drift("adwin:uncertainty,kswin:uncertainty,page-hinkley:uncertainty:threshold=2")
    registries = CollectorRegistry(), CollectorRegistry()
    one, together = (DriftMonitor(specs, Metrics(r)) for r in registries)
    by_batch = [
        e for b in range(0, 1000, 10) for e in one.update("uncertainty", values[b : b + 10], positions[b : b + 10])
    ]
    at_once = []
    for p in range(0, 1000, 100):  # ten batches a call, and an empty one
        chunk, starts = values[p : p + 100], np.array([0, 10, 20, 20, 30, 40, 50, 60, 70, 80, 90])
        at_once += together.update("uncertainty", chunk, positions[p : p + 100], starts)

    def ordered(events: list) -> list:
        return sorted((e.position, e.detector, e.value) for e in events)

    assert ordered(at_once) == ordered(by_batch)
    for registry in registries:  # the statistic is the last batch's mean, not the call's
        labels = {"detector": "adwin", "signal": "uncertainty"}
        assert registry.get_sample_value("streamcl_drift_statistic", labels) == values[990:].mean()
    assert {e.detector for e in by_batch} == {"adwin", "kswin", "page-hinkley"}
    assert all(e.position >= 600 for e in by_batch)
