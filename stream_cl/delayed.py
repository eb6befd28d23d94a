"""Delayed labels: a sample is predicted on arrival, waits in a bounded pending store, and is learned
when its label arrives on a topic of its own.

Both orders join: a label that arrives before its features waits too. Time is event time, the
messages' own timestamps, so what joins and what expires does not depend on how the two topics'
polls interleave: a pending sample expires once the label topic has moved more than the TTL past
it (its label, had it come in time, would have been read), and a waiting label expires once the
feature topic has moved more than the TTL past it (its features would have been read). Each store
holds at most ``max_pending`` entries; a full one gives up its oldest. A label that never joins
goes to the label dead-letter topic with reason ``label_unmatched``.

Where samples and labels wait is a :class:`~stream_cl.pending.PendingStore` (process memory, or
Redis: :mod:`stream_cl.pending_redis`); this module counts, measures and dead-letters what the
store settles. The store's state goes into every checkpoint with the learner and both topics'
offsets (see :meth:`DelayedLabels.state_dict`), so a restart resumes with the same samples waiting.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from consumers.label_wire import LabelRecord
from consumers.record import DeadLetter, Record
from consumers.source import Source, next_offsets
from monitoring.labeljoin import JoinMetrics
from stream_cl.pending import PendingStore, Settled, believable, wall_clock
from stream_cl.summary import Summary

log = logging.getLogger("stream_cl.delayed")

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


class DelayedLabels:
    """Joins a label topic with the predicted feature records of a run.

    Parameters
    ----------
    source
        The label messages (a Kafka source decoding :mod:`consumers.label_wire`).
    dead_letters
        Where unmatched and malformed label messages go (``<labels topic>.dlq``).
    store
        Where samples and labels wait (its TTL and bound decide what expires).
    """

    def __init__(self, source: Source, dead_letters: Any, *, store: PendingStore, metrics: JoinMetrics) -> None:
        self.source, self.dead_letters, self.store, self.metrics = source, dead_letters, store, metrics
        self.consumed = self.joined = self.unmatched = self.expired = 0
        self.delays: deque[float] = deque(maxlen=DELAYS_KEPT)

    @property
    def healthy(self) -> bool:
        """False while the pending store cannot be reached (consuming waits for it)."""
        return self.store.healthy

    def arrive(self, records: list[Record], predicted: np.ndarray) -> JoinStep:
        """Unlabelled feature records, just predicted (``predicted[i]``: record i's classes per level)."""
        return self._settle(self.store.arrive(records, predicted))

    def poll(self, limit: int) -> tuple[JoinStep, dict[tuple[str, int], int], int]:
        """Read up to ``limit`` label messages without waiting; returns what they settled, the offsets to
        commit, and how many messages were read."""
        if self.dead_letters.backpressure:  # the label dead-letter spool is full: wait
            return JoinStep(), {}, 0
        poll = self.source.poll(0.0, limit)
        if not len(poll):
            return JoinStep(), {}, 0
        self.consumed += len(poll)
        for dead in poll.dead_letters:
            self._unmatched(dead)
        step = self._settle(self.store.label(poll.records))
        return step, next_offsets(poll.positions()), len(poll)

    def count(self, summary: Summary) -> None:
        """This run's join counts and what still waits, into ``summary`` (checkpoints take their totals from it)."""
        summary.labels_consumed, summary.labels_joined = self.consumed, self.joined
        summary.labels_unmatched, summary.pending_expired = self.unmatched, self.expired
        summary.pending, summary.labels_waiting = self.store.sizes()

    def fill(self, summary: Summary) -> None:
        """:meth:`count`, and the p50/p95 label delay of this run's joins (seconds)."""
        self.count(summary)
        if self.delays:
            p50, p95 = np.percentile(np.fromiter(self.delays, dtype=np.float64), [50, 95])
            summary.label_delay_seconds = {"p50": float(p50), "p95": float(p95)}

    def state_dict(self) -> dict[str, Any]:
        """The pending store's state for a checkpoint (tensors and plain containers: it loads ``weights_only``)."""
        return self.store.state_dict()

    def restore(self, state: dict[str, Any] | None) -> None:
        """Resume with what waited at the checkpoint of ``state`` (None: the run has no checkpoint)."""
        self.store.restore(state)
        self._gauges()

    def saved(self, state: dict[str, Any]) -> None:
        """The checkpoint holding ``state`` is written (the store may drop what only older ones needed)."""
        self.store.saved(state)

    def _settle(self, settled: Settled) -> JoinStep:
        step = JoinStep()
        for record, predicted, label in settled.joined:
            step.joined.append(self._join(record, predicted, label))
        for record in settled.expired:
            self.expired += 1
            self.metrics.expired.inc()
            step.expired.append(record)
        for dead in settled.unmatched:
            self._unmatched(dead)
        self._gauges()
        return step

    def _join(self, record: Record, predicted: np.ndarray, label: LabelRecord) -> Joined:
        self.joined += 1
        self.metrics.labels.labels(outcome="joined").inc()
        # a delay measured from a timestamp the clocks do not believe would be absurd or infinite, and would stay
        # in the histogram's sum (the mean delay) for good: such a join is not measured
        _, limit = wall_clock(self.store.max_clock_skew_s)
        if believable(record.timestamp, limit) and believable(label.timestamp, limit):
            delay = max(0.0, label.timestamp - record.timestamp)
            self.delays.append(delay)
            self.metrics.delay.observe(delay)
        return Joined(replace(record, label=label.label), predicted)

    def _unmatched(self, dead: DeadLetter) -> None:
        self.unmatched += 1
        self.metrics.labels.labels(outcome="unmatched").inc()
        self.dead_letters.send(dead)
        log.debug("unmatched label at %s: %s %s", dead.message.position, dead.reason, dead.detail)

    def _gauges(self) -> None:
        pending, waiting = self.store.sizes()
        self.metrics.pending.set(pending)
        self.metrics.waiting.set(waiting)
