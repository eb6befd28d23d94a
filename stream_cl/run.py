"""The run loop: poll, decode, predict-then-learn, update metrics, commit. One function, no hooks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from prometheus_client import Counter
from tqdm import tqdm

from consumers.record import DeadLetter, Poll, Record
from consumers.source import Instrumented, Source, next_offsets
from monitoring.drift import DriftMonitor
from monitoring.hierarchy import level_correct
from monitoring.metrics import OUTCOMES, Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeResult, ProbeSet
from stream_cl.learner import Batch, Learner, Observation
from stream_cl.overload import OverloadPolicy
from stream_cl.predictions import Predictions
from stream_cl.summary import Summary

if TYPE_CHECKING:  # the checkpointer imports RunState from here
    from stream_cl.checkpointer import Checkpointer

log = logging.getLogger("stream_cl.run")

RUN_REASONS = ("shape_mismatch", "label_conflict")
"""Dead-letter reasons found after decoding (the decoder's own are in ``consumers.wire.REASONS``)."""

LearnerFactory = Callable[[tuple[int, ...], np.dtype], Learner]
"""Builds the learner from the first record's input shape and dtype."""


class DeadLetterSink(Protocol):
    """Where records that cannot be learned go (a Kafka topic, a file, or nowhere but counters)."""

    def send(self, dead: DeadLetter) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    """How the loop polls and when it stops.

    ``max_records`` counts every polled message (good or bad); ``until_idle_s`` stops an
    unbounded source after that long without a message; ``probe_every`` is the number of learned
    records between probe evaluations.
    """

    batch_size: int = 10
    max_records: int | None = None
    poll_timeout_s: float = 1.0
    until_idle_s: float | None = None
    probe_every: int = 500
    online_window: int = 1000
    progress: bool = True


@dataclass
class RunState:
    """Everything the loop carries between batches; ``learner`` is built on the first record."""

    learner: Learner | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: np.dtype | None = None


def run_stream(
    source: Source,
    make_learner: LearnerFactory,
    metrics: Metrics,
    probe: ProbeSet,
    options: RunOptions = RunOptions(),
    *,
    dead_letters: DeadLetterSink | None = None,
    state: RunState | None = None,
    stop: threading.Event | None = None,
    drift: DriftMonitor | None = None,
    checkpointer: Checkpointer | None = None,
    overload: OverloadPolicy | None = None,
    predictions: Predictions | None = None,
) -> tuple[Summary, RunState]:
    """Learn ``source`` until it ends, goes idle, hits ``max_records`` or ``stop`` is set."""
    state = state or RunState()
    stop = stop or threading.Event()
    summary = Summary()
    accuracy = PrequentialAccuracy(options.online_window)
    counted = {outcome: metrics.samples.labels(outcome=outcome) for outcome in OUTCOMES}
    parent_maps: list[np.ndarray] = []
    parent_sizes: list[int] = []  # the tree's class counts when parent_maps was built
    started = last_message = last_rate = time.monotonic()
    polled = rate_count = since_probe = 0
    bar = tqdm(total=options.max_records, unit="rec", disable=not options.progress, dynamic_ncols=True)
    while not stop.is_set():
        limit = options.batch_size
        if options.max_records is not None:
            limit = min(limit, options.max_records - polled)
            if limit <= 0:
                break
        poll = source.poll(options.poll_timeout_s, limit)
        now = time.monotonic()
        if not len(poll):
            idle = options.until_idle_s is not None and now - last_message >= options.until_idle_s
            if source.exhausted or idle:
                break
            continue
        last_message = now
        polled += len(poll)
        records = _screen(poll, state, make_learner)
        for dead in poll.dead_letters:
            _dead_letter(dead, summary, metrics, dead_letters)
        learn, held = _split_probe(records, probe)
        if held:
            summary.held_out += len(held)
            counted["held_out"].inc(len(held))
        if overload is not None:
            learn = overload.admit(learn)
        if learn:
            observation = _observe(state.learner, learn, metrics)
            if predictions is not None:
                predictions.publish(learn, observation.prediction, state.learner.labels, now)
            sizes = state.learner.labels.sizes  # the tree grows with new labels, and with replay from a shared buffer
            if sizes != parent_sizes:
                parent_maps, parent_sizes = state.learner.labels.parent_maps(), sizes
            correct = _score(observation, accuracy, summary, counted, parent_maps)
            if drift is not None:
                _watch_drift(drift, observation, correct, learn, summary)
            since_probe += observation.stats.n_learned
        offsets = next_offsets(poll.positions())
        source.commit(offsets)
        if checkpointer is not None:
            checkpointer.step(state, offsets, len(poll), summary.learned)
        if state.learner is not None and since_probe >= options.probe_every:
            _publish_probe(_evaluate(probe, state.learner), metrics)
            _publish_buffer(state.learner, metrics)
            since_probe = 0
        bar.update(len(poll))
        rate_count += len(poll)
        if now - last_rate >= 1.0:  # gauges change every batch but are scraped every few seconds
            metrics.samples_per_second.set(rate_count / (now - last_rate))
            last_rate, rate_count = now, 0
            _publish_gauges(state.learner, accuracy, source, metrics)
    bar.close()
    _publish_gauges(state.learner, accuracy, source, metrics)
    summary.learned_total = summary.learned
    if checkpointer is not None:
        checkpointer.finish(state, summary.learned)
        summary.learned_total += checkpointer.learned_base
    elapsed = time.monotonic() - started
    if state.learner is not None:
        _finish(summary, state.learner, _evaluate(probe, state.learner), metrics)
    summary.online_accuracy = accuracy.cumulative()
    summary.elapsed_seconds = elapsed
    summary.samples_per_second = polled / elapsed if elapsed > 0 else 0.0
    return summary, state


def _screen(poll: Poll, state: RunState, make_learner: LearnerFactory) -> list[Record]:
    """Records that can enter the learner; the others join ``poll.dead_letters``."""
    fitting = []
    for record in poll.records:
        if state.learner is None:
            state.input_shape, state.input_dtype = record.x.shape, record.x.dtype
            state.learner = make_learner(record.x.shape, record.x.dtype)
        if record.x.shape != state.input_shape or record.x.dtype != state.input_dtype:
            detail = f"{record.x.dtype}{list(record.x.shape)} != {state.input_dtype}{list(state.input_shape)}"
            poll.dead_letters.append(DeadLetter(record.message, "shape_mismatch", detail))
        else:
            fitting.append(record)
    if not fitting:
        return []
    good = []
    for record, problem in zip(fitting, state.learner.labels.problems([r.label for r in fitting]), strict=True):
        if problem is None:
            good.append(record)
        else:
            poll.dead_letters.append(DeadLetter(record.message, "label_conflict", problem))
    return good


def _dead_letter(dead: DeadLetter, summary: Summary, metrics: Metrics, sink: DeadLetterSink | None) -> None:
    if sink is not None:
        sink.send(dead)
    summary.dead_letter[dead.reason] = summary.dead_letter.get(dead.reason, 0) + 1
    metrics.dead_letters.labels(reason=dead.reason).inc()
    metrics.samples.labels(outcome="dead_letter").inc()
    log.debug("dead letter %s at %s: %s", dead.reason, dead.message.position, dead.detail)


def _split_probe(records: list[Record], probe: ProbeSet) -> tuple[list[Record], list[Record]]:
    if probe.fraction == 0:
        return records, []
    learn, held = [], []
    for record in records:
        if record.label is not None and probe.holds_out(record.id):
            probe.add(record.x, record.label)
            held.append(record)
        else:
            learn.append(record)
    return learn, held


def _observe(learner: Learner, records: list[Record], metrics: Metrics) -> Observation:
    x = torch.from_numpy(np.stack([r.x for r in records]))
    started = time.perf_counter()
    observation = learner.observe(Batch(x, [r.label for r in records]))
    metrics.learn_step.observe(time.perf_counter() - started)
    return observation


def _score(
    obs: Observation,
    accuracy: PrequentialAccuracy,
    summary: Summary,
    counted: dict[str, Counter],
    parent_maps: list[np.ndarray],
) -> np.ndarray:
    """Count the batch and update prequential accuracy per level (HLE parent rule, see monitoring.hierarchy).

    Returns whether each labelled sample was predicted right (in batch order).
    """
    y, levels, predicted = obs.y.cpu().numpy(), obs.level.cpu().numpy(), obs.prediction.classes.cpu().numpy()
    labelled = y >= 0
    n_labelled = int(labelled.sum())
    summary.learned += n_labelled
    summary.predicted += len(y) - n_labelled
    counted["learned"].inc(n_labelled)
    if n_labelled < len(y):
        counted["predicted"].inc(len(y) - n_labelled)
        y, levels, predicted = y[labelled], levels[labelled], predicted[labelled]
    if not n_labelled:
        return np.zeros(0, dtype=bool)
    correct = level_correct(predicted, levels, y, parent_maps)
    accuracy.update(levels, correct)
    return correct


def _watch_drift(
    drift: DriftMonitor, obs: Observation, correct: np.ndarray, records: list[Record], summary: Summary
) -> None:
    """Feed the batch's error (as scored by ``_score``), loss and uncertainty signals at the records' offsets."""
    positions = np.fromiter((r.position.offset for r in records), dtype=np.int64, count=len(records))
    labelled = obs.y.cpu().numpy() >= 0
    events = []
    if "error" in drift.signals and labelled.any():
        events += drift.update("error", ~correct, positions[labelled])
    if "loss" in drift.signals and obs.stats.loss is not None:
        events += drift.update("loss", np.array([obs.stats.loss]), positions[labelled][-1:])
    if "uncertainty" in drift.signals:
        known = obs.prediction.classes.cpu().numpy() >= 0
        rows = known.any(axis=1)
        if rows.any():
            confidence = (obs.prediction.confidence.cpu().numpy() * known).sum(axis=1)
            mean_conf = confidence / np.maximum(known.sum(axis=1), 1)
            events += drift.update("uncertainty", 1 - mean_conf[rows], positions[rows])
    if events:
        summary.drift_events.extend(sorted((e.as_dict() for e in events), key=lambda e: e["position"]))


def _publish_gauges(learner: Learner | None, accuracy: PrequentialAccuracy, source: Source, metrics: Metrics) -> None:
    """The per-second gauges: windowed online accuracy, classes seen, buffer size and errors, source lag."""
    for level in accuracy.levels:
        metrics.online_accuracy.labels(level=str(level)).set(accuracy.windowed(level))
    if learner is not None:
        _publish_learner(learner, metrics)
    if isinstance(source, Instrumented):
        _publish_source(source, metrics)


def _publish_source(source: Instrumented, metrics: Metrics) -> None:
    """Consumer lag per partition (series of partitions no longer owned are dropped) and decode times."""
    metrics.consumer_lag.clear()
    for (topic, partition), lag in source.lag().items():
        metrics.consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)
    for seconds in source.take_decode_seconds():
        metrics.decode_seconds.observe(seconds)


def _publish_learner(learner: Learner, metrics: Metrics) -> None:
    for level, size in enumerate(learner.labels.sizes):
        metrics.classes_seen.labels(level=str(level)).set(size)
    metrics.buffer_size.set(len(learner.buffer))
    metrics.buffer_errors.inc(learner.buffer.take_errors())


def _publish_buffer(learner: Learner, metrics: Metrics) -> None:
    """Buffer composition per class (at probe time: a Redis store answers it with a round trip)."""
    metrics.buffer_bytes.set(learner.buffer.nbytes)
    names = learner.labels.names
    for (level, index), count in learner.buffer.class_counts().items():
        if level >= len(names) or index >= len(names[level]):
            continue  # stored by another learner sharing the Redis buffer, under a class this one has not seen
        name = names[level][index]
        if metrics.class_series_allowed(level, name):
            metrics.buffer_class_count.labels(**{"class": name}).set(count)


def _evaluate(probe: ProbeSet, learner: Learner) -> ProbeResult:
    def predict(x: np.ndarray) -> np.ndarray:
        return learner.predict(torch.from_numpy(x)).classes.cpu().numpy()

    return probe.evaluate(predict, learner.labels.lookup, parent_maps=learner.labels.parent_maps())


def _publish_probe(result: ProbeResult, metrics: Metrics) -> None:
    for level, acc in result.level_accuracy.items():
        metrics.accuracy.labels(level=str(level)).set(acc)
        metrics.forgetting.labels(level=str(level)).set(result.level_forgetting[level])
    for path, acc in result.class_accuracy.items():
        level, name = str(len(path) - 1), path[-1]
        if metrics.class_series_allowed(len(path) - 1, name):
            metrics.class_accuracy.labels(level=level, **{"class": name}).set(acc)
            metrics.class_forgetting.labels(level=level, **{"class": name}).set(result.class_forgetting.get(path, 0.0))


def _finish(summary: Summary, learner: Learner, result: ProbeResult, metrics: Metrics) -> None:
    _publish_probe(result, metrics)
    _publish_buffer(learner, metrics)
    summary.final_accuracy = result.accuracy
    summary.forgetting = result.forgetting
    summary.final_accuracy_by_level = {str(k): v for k, v in result.level_accuracy.items()}
    summary.forgetting_by_level = {str(k): v for k, v in result.level_forgetting.items()}
    summary.classes_seen_by_level = learner.labels.sizes
    summary.classes_seen = sum(learner.labels.sizes)
    summary.method = learner.name
