"""What a run shows on ``/metrics`` besides per-batch counters: gauges once a second, probe results, buffer stats,
and the loop's heartbeat behind ``/healthz``."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from prometheus_client import Counter

from buffers.store import BufferStats
from consumers.source import Instrumented, Source
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeResult, ProbeSet
from stream_cl.learner import Learner

GAUGE_INTERVAL_S = 1.0
"""Gauges change every batch but are scraped every few seconds: publishing them once a second is enough."""


class Heartbeat:
    """When the run loop last turned: beaten by the loop's :class:`Publisher` on every turn, also while no
    record arrives (an idle stream is healthy) and while a turn waits for a dependency that is down (see
    :meth:`waiting`), read by ``/healthz`` on the exporter's thread (the service hands the run's
    :class:`~stream_cl.run.RunParts` heartbeat to both)."""

    def __init__(self) -> None:
        self.last = time.monotonic()  # start-up counts as a turn: the probe is 200 until the loop is late
        self.publisher: Publisher | None = None  # the run's, once it runs: a wait publishes its gauges too

    def beat(self, now: float) -> None:
        self.last = now

    def waiting(self) -> None:
        """Called every second or so by a dependency a turn waits for on purpose (the Redis pending store during
        an outage, which ``/readyz`` reports): the loop is paused, not stuck, so beat, and keep the run's gauges
        (lag, spool, accuracy) current so that alerts on them still work."""
        now = time.monotonic()
        self.beat(now)
        if self.publisher is not None:
            self.publisher.waiting(now)

    def alive(self, stall_after_s: float) -> bool:
        return time.monotonic() - self.last < stall_after_s


class Publisher:
    """Publishes a run's gauges on a timer (also while the stream is idle, so rates fall to 0 and lag stays
    true) and its probe and buffer figures when asked; beats ``heartbeat`` on every turn."""

    def __init__(
        self,
        metrics: Metrics,
        dead_letters: Sequence[object] = (),
        heartbeat: Heartbeat | None = None,
        label_sources: Sequence[Source] = (),
    ) -> None:
        self.metrics = metrics
        # with delayed labels, the label topic's consumer: records it never fetched are skipped offsets too
        self.label_sources = list(label_sources)
        # sinks that can spool: the data topic's and, with delayed labels, the label topic's (published together)
        self.dead_letters = [sink for sink in dead_letters if hasattr(sink, "spooled")]
        self._counted: dict[Counter, int] = {}  # each counter's cumulative total as last published
        if self.dead_letters:  # at 0 from the start, so the first rejection is an increase
            metrics.dead_letter_rejected.inc(0)
        self.heartbeat = heartbeat or Heartbeat()
        self.heartbeat.publisher = self
        self._turn: tuple[Learner | None, PrequentialAccuracy, Source] | None = None  # the last tick's arguments
        self._last = time.monotonic()
        self._records = 0
        self._rate = 0.0  # records per second over the last interval published
        metrics.samples_per_second.set_function(self._samples_per_second)
        self._buffer_classes: set[tuple[str, str]] = set()  # (level, class) series published so far
        self._lag_series: set[tuple[str, str]] = set()  # (topic, partition) series published last time

    def count(self, records: int) -> None:
        self._records += records

    def tick(self, now: float, learner: Learner | None, accuracy: PrequentialAccuracy, source: Source) -> None:
        """Beat the heartbeat (the loop calls this on every turn) and publish the per-second gauges if a second
        has passed since the last time."""
        self._turn = (learner, accuracy, source)
        self.heartbeat.beat(now)
        if now - self._last >= GAUGE_INTERVAL_S:
            self.gauges(now, learner, accuracy, source)

    def waiting(self, now: float) -> None:
        """Tick again from inside a turn that waits (:meth:`Heartbeat.waiting`), with that turn's learner,
        accuracy and source."""
        if self._turn is not None:
            self.tick(now, *self._turn)

    def gauges(self, now: float, learner: Learner | None, accuracy: PrequentialAccuracy, source: Source) -> None:
        """Records per second, windowed online accuracy, classes seen, buffer size, bytes, errors, corrupt samples
        and repairs, source lag, dead-letter spool, sink and rejections."""
        m = self.metrics
        self._rate = self._records / max(now - self._last, 1e-9)
        self._last, self._records = now, 0
        for level in accuracy.levels:
            m.online_accuracy.labels(level=str(level)).set(accuracy.windowed(level))
        if learner is not None:
            for level, size in enumerate(learner.labels.sizes):
                m.classes_seen.labels(level=str(level)).set(size)
            m.buffer_size.set(len(learner.buffer))
            # without class counts the stats cost no Redis round trip: a buffer error reaches its alert within a
            # second, not at the next probe evaluation (never, if the stream goes quiet before one)
            self._buffer_totals(learner.buffer.stats(classes=False))
        if self.dead_letters:
            m.dead_letter_spool.set(sum(sink.spooled for sink in self.dead_letters))
            m.dead_letter_sink_up.set(int(all(sink.healthy for sink in self.dead_letters)))
            self._count_to(m.dead_letter_rejected, sum(sink.rejected for sink in self.dead_letters))
        if isinstance(source, Instrumented):
            m.assigned_partitions.set(len(source.assignment()))
            for seconds in source.take_decode_seconds():
                m.decode_seconds.observe(seconds)
        # the label topic's backlog too: labels read late join late, and a stuck label consumer learns nothing
        consumers = [c for c in (source, *self.label_sources) if isinstance(c, Instrumented)]
        lags = {
            (topic, str(partition)): lag for consumer in consumers for (topic, partition), lag in consumer.lag().items()
        }
        # only the series of partitions no longer owned are dropped: a scrape between emptying the gauge and setting
        # it again would find a still-owned partition's series gone, which Prometheus marks stale (resetting `for:`)
        for topic, partition in self._lag_series - lags.keys():
            m.consumer_lag.remove(topic, partition)
        for (topic, partition), lag in lags.items():
            m.consumer_lag.labels(topic=topic, partition=partition).set(lag)
        self._lag_series = set(lags)
        skipped: dict[str, int] = {}
        for consumer in (source, *self.label_sources):  # Kafka sources count records gone unread
            for reason, count in getattr(consumer, "skipped_offsets", dict)().items():
                skipped[reason] = skipped.get(reason, 0) + count
        for reason, total in skipped.items():
            self._count_to(m.offsets_skipped.labels(reason=reason), total)

    def _samples_per_second(self) -> float:
        """``streamcl_samples_per_second`` at scrape time: the last interval's rate while the loop publishes, 0
        once it is an interval late (stuck in one turn, or the run is over: no record was polled meanwhile), so a
        stalled loop does not keep reporting the throughput it had."""
        return self._rate if time.monotonic() - self._last < 2 * GAUGE_INTERVAL_S else 0.0

    def buffer(self, learner: Learner) -> int:
        """Buffer bytes, errors, corrupt samples, repairs and composition per class, at the probe cadence (the class
        counts cost a Redis store a round trip; :meth:`gauges` publishes the rest every second).

        Returns the buffer's failed operations so far.
        """
        stats = learner.buffer.stats(classes=True)
        self._buffer_totals(stats)
        self._class_counts(learner.labels.names, stats.class_counts)
        return stats.errors

    def _buffer_totals(self, stats: BufferStats) -> None:
        """Buffer bytes and the store's cumulative errors, corrupt samples and repairs."""
        m = self.metrics
        m.buffer_bytes.set(stats.nbytes)
        self._count_to(m.buffer_errors, stats.errors)
        self._count_to(m.buffer_corrupt, stats.corrupt)
        self._count_to(m.buffer_repairs, stats.repairs)

    def _count_to(self, counter: Counter, total: int) -> None:
        """Raise ``counter`` to a cumulative ``total`` its source keeps (a sink's or a store's), by the difference."""
        done = self._counted.get(counter, 0)
        if total > done:
            counter.inc(total - done)
            self._counted[counter] = total

    def _class_counts(self, names: list[list[str]], counts: dict[tuple[int, int], int]) -> None:
        """Buffer samples per class; a class published before and since evicted reads 0, not its last count."""
        m = self.metrics
        now: dict[tuple[str, str], int] = {}
        for (level, index), count in counts.items():
            if level >= len(names) or index >= len(names[level]):
                continue  # stored by another learner sharing the Redis buffer, under a class this one has not seen
            name = names[level][index]
            if m.class_series_allowed(level, name):
                now[(str(level), name)] = count
        for key in self._buffer_classes - now.keys():
            now[key] = 0
        for (level, name), count in now.items():
            m.buffer_class_count.labels(level=level, **{"class": name}).set(count)
        self._buffer_classes |= now.keys()

    def probe(self, result: ProbeResult) -> None:
        m = self.metrics
        for level, acc in result.level_accuracy.items():
            m.accuracy.labels(level=str(level)).set(acc)
            m.forgetting.labels(level=str(level)).set(result.level_forgetting[level])
        for path, acc in result.class_accuracy.items():
            level, name = str(len(path) - 1), path[-1]
            if m.class_series_allowed(len(path) - 1, name):
                m.class_accuracy.labels(level=level, **{"class": name}).set(acc)
                m.class_forgetting.labels(level=level, **{"class": name}).set(result.class_forgetting.get(path, 0.0))


def evaluate(probe: ProbeSet, learner: Learner) -> ProbeResult:
    """The probe set scored on the learner's current model."""

    def predict(x: np.ndarray) -> np.ndarray:
        return learner.predict(torch.from_numpy(x)).classes.cpu().numpy()

    return probe.evaluate(predict, learner.labels.lookup, parent_maps=learner.labels.parent_maps())
