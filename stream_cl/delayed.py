"""Delayed labels: a sample is predicted on arrival, waits in a bounded pending store, and is learned
when its label arrives on a topic of its own.

Both orders join: a label that arrives before its features waits too. Time is event time, the
messages' own timestamps, so what joins and what expires does not depend on how the two topics'
polls interleave: a pending sample expires once the label topic has moved more than the TTL past
it (its label, had it come in time, would have been read), and a waiting label expires once the
feature topic has moved more than the TTL past it (its features would have been read). Each store
holds at most ``max_pending`` entries; a full one gives up its oldest. A label that never joins
goes to the label dead-letter topic with reason ``label_unmatched``.

The stores' contents go into every checkpoint with the learner and both topics' offsets (see
:meth:`DelayedLabels.state_dict`), so a restart resumes with the same samples waiting.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from consumers.label_wire import LabelRecord
from consumers.record import DeadLetter, Message, Position, Record
from consumers.source import Source, next_offsets
from consumers.wire import sample_message
from monitoring.labeljoin import JoinMetrics
from stream_cl.summary import Summary

log = logging.getLogger("stream_cl.delayed")

UNMATCHED = "label_unmatched"
"""Dead-letter reason of a label that joined no sample (unknown id, already joined, expired, or evicted)."""

DELAYS_KEPT = 100_000
"""Most recent label delays kept for the summary's percentiles."""


@dataclass(frozen=True, slots=True)
class Joined:
    """A sample with its label, and the per-level classes predicted when it arrived (-1: no class yet)."""

    record: Record
    predicted: np.ndarray


@dataclass(slots=True)
class JoinStep:
    """What one arrival or label poll settled: samples to learn now, and samples given up (predicted only)."""

    joined: list[Joined] = field(default_factory=list)
    expired: list[Record] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    record: Record
    predicted: np.ndarray


class DelayedLabels:
    """Joins a label topic with the predicted feature records of a run.

    Parameters
    ----------
    source
        The label messages (a Kafka source decoding :mod:`consumers.label_wire`).
    dead_letters
        Where unmatched and malformed label messages go (``<labels topic>.dlq``).
    ttl_s
        Longest event-time gap between a sample and its label (either order).
    max_pending
        Most samples waiting for a label, and most labels waiting for their sample.
    """

    def __init__(
        self, source: Source, dead_letters: Any, *, ttl_s: float, max_pending: int, metrics: JoinMetrics
    ) -> None:
        if ttl_s <= 0 or max_pending <= 0:
            raise ValueError(f"ttl_s and max_pending must be > 0, got {ttl_s} and {max_pending}")
        self.source, self.dead_letters, self.metrics = source, dead_letters, metrics
        self.ttl_s, self.max_pending = ttl_s, max_pending
        self.pending: OrderedDict[str, _Pending] = OrderedDict()
        self.waiting: OrderedDict[str, LabelRecord] = OrderedDict()
        self.feature_time = self.label_time = float("-inf")  # newest event time seen on each topic
        self.consumed = self.joined = self.unmatched = self.expired = 0
        self.delays: deque[float] = deque(maxlen=DELAYS_KEPT)

    def arrive(self, records: list[Record], predicted: np.ndarray) -> JoinStep:
        """Unlabelled feature records, just predicted (``predicted[i]``: record i's classes per level)."""
        step = JoinStep()
        for record, classes in zip(records, predicted, strict=True):
            label = self.waiting.pop(record.id, None)
            if label is not None:
                step.joined.append(self._join(record, classes, label))
            else:
                old = self.pending.pop(record.id, None)  # a repeated id replaces the sample that waited
                if old is not None:
                    self._expire(old.record, step)
                self.pending[record.id] = _Pending(record, classes)
                if len(self.pending) > self.max_pending:
                    self._expire(self.pending.popitem(last=False)[1].record, step)
            self.feature_time = max(self.feature_time, record.timestamp)
            self._expire_labels()
            self._expire_pending(step)
        self._gauges()
        return step

    def poll(self, limit: int) -> tuple[JoinStep, dict[tuple[str, int], int], int]:
        """Read up to ``limit`` label messages without waiting; returns what they settled, the offsets to
        commit, and how many messages were read."""
        step = JoinStep()
        if self.dead_letters.backpressure:  # the label dead-letter spool is full: wait
            return step, {}, 0
        poll = self.source.poll(0.0, limit)
        if not len(poll):
            return step, {}, 0
        self.consumed += len(poll)
        for dead in poll.dead_letters:
            self._unmatched(dead)
        for label in poll.records:
            found = self.pending.pop(label.id, None)
            if found is not None:
                step.joined.append(self._join(found.record, found.predicted, label))
            else:
                older = self.waiting.pop(label.id, None)
                if older is not None:
                    self._unmatched(DeadLetter(older.message, UNMATCHED, "a newer label for the same id arrived"))
                self.waiting[label.id] = label
                if len(self.waiting) > self.max_pending:
                    evicted = self.waiting.popitem(last=False)[1]
                    self._unmatched(DeadLetter(evicted.message, UNMATCHED, "evicted: too many labels waiting"))
            self.label_time = max(self.label_time, label.timestamp)
            self._expire_pending(step)
        self._gauges()
        return step, next_offsets(poll.positions()), len(poll)

    def count(self, summary: Summary) -> None:
        """This run's join counts and what still waits, into ``summary`` (checkpoints take their totals from it)."""
        summary.labels_consumed, summary.labels_joined = self.consumed, self.joined
        summary.labels_unmatched, summary.pending_expired = self.unmatched, self.expired
        summary.pending, summary.labels_waiting = len(self.pending), len(self.waiting)

    def fill(self, summary: Summary) -> None:
        """:meth:`count`, and the p50/p95 label delay of this run's joins (seconds)."""
        self.count(summary)
        if self.delays:
            p50, p95 = np.percentile(np.fromiter(self.delays, dtype=np.float64), [50, 95])
            summary.label_delay_seconds = {"p50": float(p50), "p95": float(p95)}

    def state_dict(self) -> dict[str, Any]:
        """The stores and event times, as tensors and plain containers (checkpoints load ``weights_only``)."""
        return {
            "feature_time": self.feature_time,
            "label_time": self.label_time,
            "pending": [
                {
                    "id": p.record.id,
                    "x": torch.from_numpy(p.record.x.copy()),
                    "predicted": torch.from_numpy(p.predicted.copy()),
                    "message": _message_state(p.record.message),
                }
                for p in self.pending.values()
            ],
            "waiting": [
                {"id": w.id, "label": list(w.label), "message": _message_state(w.message)}
                for w in self.waiting.values()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feature_time, self.label_time = float(state["feature_time"]), float(state["label_time"])
        self.pending.clear()
        self.waiting.clear()
        for entry in state["pending"]:
            message = _message(entry["message"])
            record = Record(entry["id"], entry["x"].numpy(), None, message.position, message.timestamp, message)
            self.pending[record.id] = _Pending(record, entry["predicted"].numpy())
        for entry in state["waiting"]:
            message = _message(entry["message"])
            label = LabelRecord(entry["id"], tuple(entry["label"]), message.position, message.timestamp, message)
            self.waiting[label.id] = label
        self._gauges()

    def _join(self, record: Record, predicted: np.ndarray, label: LabelRecord) -> Joined:
        delay = max(0.0, label.timestamp - record.timestamp)
        self.joined += 1
        self.delays.append(delay)
        self.metrics.delay.observe(delay)
        self.metrics.labels.labels(outcome="joined").inc()
        return Joined(replace(record, label=label.label), predicted)

    def _expire(self, record: Record, step: JoinStep) -> None:
        self.expired += 1
        self.metrics.expired.inc()
        step.expired.append(record)

    def _expire_pending(self, step: JoinStep) -> None:
        while self.pending:
            oldest = next(iter(self.pending.values()))
            if oldest.record.timestamp + self.ttl_s >= self.label_time:
                return
            self._expire(self.pending.popitem(last=False)[1].record, step)

    def _expire_labels(self) -> None:
        while self.waiting:
            oldest = next(iter(self.waiting.values()))
            if oldest.timestamp + self.ttl_s >= self.feature_time:
                return
            self.waiting.popitem(last=False)
            self._unmatched(
                DeadLetter(oldest.message, UNMATCHED, f"no features for id {oldest.id!r:.80} within the TTL")
            )

    def _unmatched(self, dead: DeadLetter) -> None:
        self.unmatched += 1
        self.metrics.labels.labels(outcome="unmatched").inc()
        self.dead_letters.send(dead)
        log.debug("unmatched label at %s: %s %s", dead.message.position, dead.reason, dead.detail)

    def _gauges(self) -> None:
        self.metrics.pending.set(len(self.pending))
        self.metrics.waiting.set(len(self.waiting))


def _message_state(message: Message) -> dict[str, Any]:
    """A message as checkpoint data: its bytes kept exactly, so a later dead letter still carries them.

    A sample of a message of several keeps only its own part (not the whole message once per sample).
    """
    message = sample_message(message)
    p = message.position
    return {
        "position": [p.stream, p.partition, p.offset, p.index, p.count],
        "timestamp": message.timestamp,
        "key": None if message.key is None else _tensor(message.key),
        "value": _tensor(message.value),
        "headers": [[name, _tensor(value)] for name, value in message.headers],
    }


def _message(state: dict[str, Any]) -> Message:
    stream, partition, offset, *sample = state["position"]  # older checkpoints: no index and count
    key = None if state["key"] is None else state["key"].numpy().tobytes()
    headers = tuple((name, value.numpy().tobytes()) for name, value in state["headers"])
    position = Position(stream, int(partition), int(offset), *map(int, sample))
    return Message(position, float(state["timestamp"]), key, state["value"].numpy().tobytes(), headers)


def _tensor(data: bytes) -> torch.Tensor:
    return torch.tensor(np.frombuffer(data, dtype=np.uint8).copy())
