"""The run loop: poll, screen, predict-then-learn, count, commit. One function, no hooks.

Every polled record gets exactly one outcome (learned, held out for the probe, predicted only,
skipped by the overload policy, or dead-lettered), so the summary's counts add up.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from consumers.record import DeadLetter, Poll, Record
from consumers.source import Instrumented, Offsets, Progressing, Source, next_offsets
from monitoring.drift import DriftMonitor
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeSet
from stream_cl.checkpointer import Checkpointer
from stream_cl.delayed import DelayedLabels, Joined, JoinStep
from stream_cl.learner import Batch, Learner, LearnerFactory, Observation, RunState
from stream_cl.methods.common import FLOAT32_MAX
from stream_cl.models import UnsupportedInput
from stream_cl.overload import OverloadPolicy
from stream_cl.predictions import Predictions
from stream_cl.publishing import Heartbeat, Publisher, evaluate
from stream_cl.scoring import JOINED_SIGNALS, arrival_scored, score, watch_drift
from stream_cl.summary import Summary

log = logging.getLogger("stream_cl.run")

RUN_REASONS = (
    "shape_mismatch",
    "label_conflict",
    "too_many_classes",
    "non_finite_loss",
    "extreme_input",
    "unsupported_input",
)
"""Dead-letter reasons found after decoding (the decoder's own are in ``consumers.wire.REASONS``)."""

LABEL_POLL_BATCHES = 50
"""Label messages read per loop turn, in batches: labels are small, and joined samples are learned batch by batch."""

ASSIGNMENT_GRACE_S = 60.0
"""How long past ``until_idle_s`` a Kafka source may wait for its first partitions, and records may wait unread
with no change in its lag, before the run gives up waiting."""


class DeadLetterSink(Protocol):
    """Where records that cannot be learned go (a Kafka topic, a file, or nowhere but the counters).

    ``send`` never blocks for long; ``backpressure`` is True while the sink cannot take more (the
    loop stops polling until it can); ``healthy`` is False while dead letters cannot be delivered. A
    sink that spools also reports ``spooled`` (dead letters waiting), exported with ``healthy``.
    """

    backpressure: bool
    healthy: bool

    def send(self, dead: DeadLetter) -> None: ...


class Lockstep(Protocol):
    """Workers of a group that learn one model step by step together (:class:`stream_cl.group.Group`).

    ``agree`` turns this worker's polled count, end (idle, exhausted, ``max_records``) and stop
    request into the group's ``(stop, step)``; after a step, ``finish_step`` makes the collectives
    this worker skipped (it had nothing to learn), so no worker waits for another forever.
    """

    def agree(self, polled: int, ended: bool, stopping: bool) -> tuple[bool, bool]: ...

    def finish_step(self, state: RunState) -> None: ...


class CountOnly:
    """The sink of a run with nowhere to send dead letters: they are only counted."""

    backpressure = False
    healthy = True

    def send(self, dead: DeadLetter) -> None:
        pass


@dataclass(frozen=True)
class RunOptions:
    """How the loop batches, measures and stops.

    ``max_records`` counts every polled message (good or bad); ``until_idle_s`` stops once no
    message arrived for that long, counted from a Kafka source's first partition assignment;
    ``probe_every`` is the number of learned records between probe evaluations;
    ``max_classes`` bounds the classes (all levels) a stream may bring.
    """

    batch_size: int = 10
    max_records: int | None = None
    until_idle_s: float | None = None
    probe_every: int = 500
    online_window: int = 1000
    max_classes: int | None = None
    progress: bool = True


@dataclass
class RunParts:
    """The collaborators of a run besides its source, learner and metrics; each optional one may be None."""

    probe: ProbeSet = field(default_factory=lambda: ProbeSet(fraction=0.0))
    accuracy: PrequentialAccuracy | None = None  # None: a new one over RunOptions.online_window
    dead_letters: DeadLetterSink = field(default_factory=CountOnly)
    drift: DriftMonitor | None = None
    checkpointer: Checkpointer | None = None
    overload: OverloadPolicy | None = None
    predictions: Predictions | None = None
    labels: DelayedLabels | None = None
    lockstep: Lockstep | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)


def run_stream(
    source: Source,
    make_learner: LearnerFactory,
    metrics: Metrics,
    options: RunOptions = RunOptions(),
    parts: RunParts | None = None,
    *,
    state: RunState | None = None,
    stop: threading.Event | None = None,
) -> tuple[Summary, RunState]:
    """Learn ``source`` until it ends, goes idle, hits ``max_records`` or ``stop`` is set."""
    run = _Run(source, make_learner, metrics, options, parts or RunParts(), state or RunState())
    stop = stop or threading.Event()
    labels = run.parts.labels
    idle = _IdleClock([source] if labels is None else [source, labels.source], options.until_idle_s)
    bar = tqdm(total=options.max_records, unit="rec", disable=not options.progress, dynamic_ncols=True)
    lockstep = run.parts.lockstep
    while lockstep is not None or not stop.is_set():  # a group stops only when its workers agree
        limit = options.batch_size
        if options.max_records is not None:
            limit = min(limit, options.max_records - run.summary.consumed)
        now = time.monotonic()
        run.publisher.tick(now, run.state.learner, run.accuracy, source)
        # The dead-letter spool is full: poll nothing until it drains, never drop. A group's worker still makes
        # every group step, with no records and not ended, so its peers go on learning and a stop is agreed.
        # The label topic's spool too: features read while labels cannot be would fill the pending store unjoined.
        paused = run.parts.dead_letters.backpressure or (labels is not None and labels.dead_letters.backpressure)
        if paused and lockstep is None:
            run.save_if_due()
            stop.wait(0.1)
            continue
        poll = source.poll(source.poll_timeout_s, limit) if limit > 0 and not paused else Poll()
        if not len(poll) and run.parts.overload is not None:
            run.parts.overload.refresh()  # admit() judges only batches: a worker left without partitions polls none
        if not paused and run.join_labels():  # label messages are activity too: a run waiting for labels is not idle
            idle.saw_records(time.monotonic())
        ended = limit <= 0 or (not paused and not len(poll) and (source.exhausted or idle.expired(time.monotonic())))
        stepping = len(poll) > 0
        if lockstep is not None:
            ended, stepping = lockstep.agree(len(poll), ended, stop.is_set())
        if ended:
            break
        if not stepping:
            run.save_if_due()
            if paused:  # no poll paced this turn: every worker may be waiting
                stop.wait(0.1)
            continue
        offsets: Offsets = {}
        if len(poll):
            idle.saw_records(time.monotonic())
            run.process(poll)
            offsets = next_offsets(poll.positions())
            source.commit(offsets)
        if lockstep is not None:
            lockstep.finish_step(run.state)
        if run.parts.checkpointer is not None:
            run.parts.checkpointer.step(run.state, offsets, len(poll), run.summary)
        run.probe_if_due()
        _advance(bar, len(poll), source, options.max_records is None)
    bar.close()
    summary = run.finish()
    summary.never_assigned = lockstep is None and idle.never_assigned
    return summary, run.state


class _Run:
    """A run's state between batches: the learner, counts, accuracy and what publishes them."""

    def __init__(
        self,
        source: Source,
        make_learner: LearnerFactory,
        metrics: Metrics,
        options: RunOptions,
        parts: RunParts,
        state: RunState,
    ) -> None:
        self.source, self.make_learner, self.metrics = source, make_learner, metrics
        self.options, self.parts, self.state = options, parts, state
        self.summary = Summary()
        self.accuracy = parts.accuracy or PrequentialAccuracy(options.online_window)
        label_sinks = [parts.labels.dead_letters] if parts.labels is not None else []
        label_sources = [parts.labels.source] if parts.labels is not None else []
        self.publisher = Publisher(metrics, [parts.dead_letters, *label_sinks], parts.heartbeat, label_sources)
        self.outcomes = metrics.samples
        # the children counted every batch, looked up once (a labels() lookup takes a lock)
        self.learned_total = metrics.samples.labels(outcome="learned")
        self.predicted_total = metrics.samples.labels(outcome="predicted")
        self.parent_maps: list[np.ndarray] = []
        self.parent_sizes: list[int] = []  # the tree's class counts when parent_maps was built
        self.since_probe = 0
        self.started = time.monotonic()

    def process(self, poll: Poll) -> None:
        """One polled batch: every record ends learned, held out, predicted, skipped or dead-lettered."""
        now = time.monotonic()
        self.summary.consumed += len(poll)
        self.publisher.count(len(poll))
        learn = self._screen(poll)
        labelled = len(learn) - [r.label for r in learn].count(None)
        # unlabelled on arrival, before the overload policy may drop labels: only delayed labels need to know
        arrived = {id(r) for r in learn if r.label is None} if self.parts.labels is not None else set()
        skipped = 0
        if self.parts.overload is not None:
            learn = self.parts.overload.admit(learn)
            skipped = labelled - sum(r.label is not None for r in learn)
            if skipped:
                self.summary.overload_skipped += skipped
                self.outcomes.labels(outcome="overload_skipped").inc(skipped)
        for dead in poll.dead_letters:
            self._dead_letter(dead)
        if not learn:
            return
        learner = self.state.learner
        observation = self._observe(learner, learn)
        if observation.stats.rejected is not None:  # the learner refused the batch: its labelled records are dead
            for record in learn:
                if record.label is not None:
                    self._dead_letter(DeadLetter(record.message, observation.stats.rejected, "step skipped"))
            self._predicted(learn, arrived, observation, len(learn) - labelled)
            learn = [dataclasses.replace(r, label=None) for r in learn]  # their predictions say "not learned"
        if self.parts.predictions is not None:
            self.parts.predictions.publish(learn, observation.prediction, learner.labels, now)
        if observation.stats.rejected is not None:
            return
        n_learned = labelled - skipped
        self.summary.learned += n_learned
        self.learned_total.inc(n_learned)
        correct = score(observation, self.accuracy, self._parent_maps(learner))
        if self.parts.drift is not None:
            self.summary.drift_events.extend(watch_drift(self.parts.drift, observation, correct, learn))
        self.since_probe += n_learned
        self._predicted(learn, arrived, observation, len(learn) - labelled)

    def save_if_due(self) -> None:
        """On a turn that learns nothing (an idle stream, a full dead-letter spool): write a checkpoint if one is
        due, so the learning before the pause is saved on time, not with the next record."""
        if self.parts.checkpointer is not None:
            self.parts.checkpointer.tick(self.state, self.summary)

    def join_labels(self) -> int:
        """Read waiting label messages, learn the samples they join; returns how many messages were read."""
        labels = self.parts.labels
        if labels is None:
            return 0
        step, offsets, n = labels.poll(LABEL_POLL_BATCHES * self.options.batch_size)
        if n:
            self._settle(step)
            labels.source.commit(offsets)
            if self.parts.checkpointer is not None:
                self.parts.checkpointer.step(self.state, offsets, n, self.summary)
        return n

    def _predicted(self, records: list[Record], arrived: set[int], observation: Observation, n: int) -> None:
        """Settle the predicted records: predicted only, or (with delayed labels) pending until their label."""
        labels = self.parts.labels
        if labels is None:
            self._count_predicted(n)
            return
        rows = [i for i, r in enumerate(records) if id(r) in arrived]  # not those the overload policy unlabelled
        classes = observation.prediction.classes.cpu().numpy()[rows]
        self._settle(labels.arrive([records[i] for i in rows], classes))

    def _settle(self, step: JoinStep) -> None:
        """Expired samples end predicted only; joined ones are learned in batches, scored as predicted on arrival."""
        self.parts.labels.count(self.summary)
        self._count_predicted(len(step.expired))
        size = self.options.batch_size
        for start in range(0, len(step.joined), size):
            self._learn_joined(step.joined[start : start + size])

    def _learn_joined(self, joined: list[Joined]) -> None:
        poll = Poll(records=[j.record for j in joined])
        learn = self._screen(poll)
        for dead in poll.dead_letters:
            self._dead_letter(dead)
        # feature records arrive unlabelled, so the overload policy decides here which joined samples are learned
        if self.parts.overload is not None:
            admitted = [r for r in self.parts.overload.admit(learn) if r.label is not None]
            skipped = len(learn) - len(admitted)
            if skipped:  # predicted on arrival, never learned
                self.summary.overload_skipped += skipped
                self.outcomes.labels(outcome="overload_skipped").inc(skipped)
            learn = admitted
        if not learn:
            return
        learner = self.state.learner
        observation = self._observe(learner, learn)
        if observation.stats.rejected is not None:
            for record in learn:
                self._dead_letter(DeadLetter(record.message, observation.stats.rejected, "step skipped"))
            return
        self.summary.learned += len(learn)
        self.learned_total.inc(len(learn))
        self.since_probe += len(learn)
        at_arrival = {id(j.record): j.predicted for j in joined}
        scored = arrival_scored(observation, [at_arrival[id(r)] for r in learn])
        correct = score(scored, self.accuracy, self._parent_maps(learner))
        if self.parts.drift is not None:
            events = watch_drift(self.parts.drift, scored, correct, learn, signals=JOINED_SIGNALS)
            self.summary.drift_events.extend(events)

    def _parent_maps(self, learner: Learner) -> list[np.ndarray]:
        sizes = learner.labels.sizes  # the tree grows with new labels, and with replay from a shared buffer
        if sizes != self.parent_sizes:
            self.parent_maps, self.parent_sizes = learner.labels.parent_maps(), sizes
        return self.parent_maps

    def probe_if_due(self) -> None:
        if self.state.learner is not None and self.since_probe >= self.options.probe_every:
            self.parts.probe.follow(self.state.learner.labels)  # the batch may have grown the tree
            self.publisher.probe(evaluate(self.parts.probe, self.state.learner))
            self.publisher.buffer(self.state.learner)
            self.since_probe = 0

    def finish(self) -> Summary:
        """Final gauges, checkpoint, probe evaluation and totals."""
        summary, learner, checkpointer = self.summary, self.state.learner, self.parts.checkpointer
        self.publisher.gauges(time.monotonic(), learner, self.accuracy, self.source)
        if self.parts.labels is not None:
            self.parts.labels.fill(summary)
        if checkpointer is not None:
            checkpointer.finish(self.state, summary)
        summary.set_totals(checkpointer.base_totals if checkpointer is not None else {})
        elapsed = time.monotonic() - self.started
        if learner is not None:
            self.parts.probe.follow(learner.labels)
            result = evaluate(self.parts.probe, learner)
            self.publisher.probe(result)
            summary.buffer_errors = self.publisher.buffer(learner)
            if len(self.parts.probe):
                summary.final_accuracy, summary.forgetting = result.accuracy, result.forgetting
                summary.final_accuracy_by_level = {str(k): v for k, v in result.level_accuracy.items()}
                summary.forgetting_by_level = {str(k): v for k, v in result.level_forgetting.items()}
            summary.classes_seen_by_level = learner.labels.sizes
            summary.classes_seen = sum(learner.labels.sizes)
            summary.method = learner.name
        summary.online_accuracy = self.accuracy.cumulative()
        summary.elapsed_seconds = elapsed
        summary.samples_per_second = summary.consumed / elapsed if elapsed > 0 else 0.0
        return summary

    def _count_predicted(self, n: int) -> None:
        if n:
            self.summary.predicted += n
            self.predicted_total.inc(n)

    def _screen(self, poll: Poll) -> list[Record]:
        """Records that can enter the learner; the probe's share of them is held out, the others join
        ``poll.dead_letters``. A held-out record passes the label and class-limit checks a learned one does, after
        the batch's learned records (it may not claim a class's parent before them, since it never enters the
        tree), and its input must be finite in float32."""
        state = self.state
        fitting = poll.records if state.learner is not None else self._build_learner(poll)
        shape, dtype = state.input_shape, state.input_dtype
        if not all(r.x.shape == shape and r.x.dtype == dtype for r in fitting):  # rare: sort out the misfits
            records, fitting = fitting, []
            for record in records:
                if record.x.shape != shape or record.x.dtype != dtype:
                    detail = f"{record.x.dtype}{list(record.x.shape)} != {dtype}{list(shape)}"
                    poll.dead_letters.append(DeadLetter(record.message, "shape_mismatch", detail))
                else:
                    fitting.append(record)
        if not fitting:
            return []
        learn, held = self._split_held_out(fitting)
        problems = state.learner.labels.problems([r.label for r in learn] + [r.label for r in held])
        learn, held = _consistent(learn, problems[: len(learn)], poll), _consistent(held, problems[len(learn) :], poll)
        learn, held = self._within_class_limit(learn, held, poll)
        self._hold_out(_finite(held, poll))
        return learn

    def _build_learner(self, poll: Poll) -> list[Record]:
        """Build the learner for the first record of ``poll`` the model can take, and return the records from
        it on; those before it are ``unsupported_input`` dead letters (restarts must not fail on them again)."""
        state = self.state
        for i, record in enumerate(poll.records):
            try:
                state.learner = self.make_learner(record.x.shape, record.x.dtype)
            except UnsupportedInput as err:
                poll.dead_letters.append(DeadLetter(record.message, "unsupported_input", str(err)))
                continue
            state.input_shape, state.input_dtype = record.x.shape, record.x.dtype
            return poll.records[i:]
        return []

    def _split_held_out(self, records: list[Record]) -> tuple[list[Record], list[Record]]:
        """The records to learn and the labelled ones the probe set holds out, never trained on."""
        probe = self.parts.probe
        if probe.fraction == 0:
            return records, []
        learn, held = [], []
        for record in records:
            (held if record.label is not None and probe.holds_out(record.id) else learn).append(record)
        return learn, held

    def _within_class_limit(
        self, learn: list[Record], held: list[Record], poll: Poll
    ) -> tuple[list[Record], list[Record]]:
        """The records whose new classes still fit ``max_classes``, counting the probe's classes the tree lacks
        (learned records first); records that would pass it are dead letters."""
        limit, tree, probe = self.options.max_classes, self.state.learner.labels, self.parts.probe
        if limit is None:
            return learn, held
        probe.follow(tree)  # a restored probe set, or a batch that grew the tree: count only what the tree lacks
        known = sum(tree.sizes) + len(probe.unlearned)
        if known + sum(len(r.label) for r in (*learn, *held) if r.label is not None) <= limit:
            return learn, held  # even if every label part were new, the batch fits
        new: set[tuple[int, str]] = set()

        def fits(record: Record) -> bool:
            if record.label is None:
                return True
            label = record.label
            added = {
                (level, label[level])
                for level in range(len(label))
                if tree.lookup(label[: level + 1])[0] < 0 and (level, label[level]) not in probe.unlearned
            } - new
            if known + len(new) + len(added) > limit:
                detail = f"the stream brought more than {limit} classes (--max-classes)"
                poll.dead_letters.append(DeadLetter(record.message, "too_many_classes", detail))
                return False
            new.update(added)
            return True

        return [r for r in learn if fits(r)], [r for r in held if fits(r)]

    def _hold_out(self, held: list[Record]) -> None:
        """Add the screened held-out records to the probe set."""
        if held:
            for record in held:
                self.parts.probe.add(record.x, record.label)
            self.summary.held_out += len(held)
            self.outcomes.labels(outcome="held_out").inc(len(held))

    def _dead_letter(self, dead: DeadLetter) -> None:
        self.parts.dead_letters.send(dead)
        self.summary.dead_letter[dead.reason] = self.summary.dead_letter.get(dead.reason, 0) + 1
        self.metrics.dead_letters.labels(reason=dead.reason).inc()
        self.outcomes.labels(outcome="dead_letter").inc()
        log.debug("dead letter %s at %s: %s", dead.reason, dead.message.position, dead.detail)

    def _observe(self, learner: Learner, records: list[Record]) -> Observation:
        x = torch.from_numpy(np.array([r.x for r in records]))  # shapes match (screened): np.stack checks each
        started = time.perf_counter()
        observation = learner.observe(Batch(x, [r.label for r in records]))
        self.metrics.learn_step.observe(time.perf_counter() - started)
        return observation


def _consistent(records: list[Record], problems: list[str | None], poll: Poll) -> list[Record]:
    """``records`` whose label path fits the tree; the others are ``label_conflict`` dead letters."""
    if not any(problems):
        return records
    kept = []
    for record, problem in zip(records, problems, strict=True):
        if problem is None:
            kept.append(record)
        else:
            poll.dead_letters.append(DeadLetter(record.message, "label_conflict", problem))
    return kept


def _finite(held: list[Record], poll: Poll) -> list[Record]:
    """Held-out records whose input the learner's step guard would not refuse as non-finite (the squares of a
    float32 input overflow), which would otherwise sit in the probe and be scored at every evaluation; the
    others are ``non_finite_loss`` dead letters, as learned ones are."""
    if not held:
        return held
    inputs = np.array([r.x for r in held], dtype=np.float64).reshape(len(held), -1)
    finite = np.square(inputs).sum(axis=1) <= FLOAT32_MAX  # NaN fails the comparison too
    if finite.all():
        return held
    for record in (r for r, ok in zip(held, finite, strict=True) if not ok):
        poll.dead_letters.append(DeadLetter(record.message, "non_finite_loss", "held-out input not finite in float32"))
    return [r for r, ok in zip(held, finite, strict=True) if ok]


def _advance(bar: tqdm, records: int, source: Source, estimate_total: bool) -> None:
    """Move the progress bar; for a file, estimate the total from the share read so far, so the bar has an ETA."""
    if estimate_total and not bar.disable and isinstance(source, Progressing):
        fraction = source.fraction_read
        if fraction > 0.01:
            bar.total = max(bar.n + records, round((bar.n + records) / fraction))
    bar.update(records)


class _IdleClock:
    """When unbounded sources count as idle: ``until_idle_s`` without a record, counted from the last
    record or, for Kafka sources, from the latest first partition assignment among them (a restarted
    consumer may wait for the group to reassign partitions for longer than the idle bound, and a label
    topic's consumer may join its group after the features' one), and no record waiting unread on a
    Kafka source's partitions (fetches from a loaded broker can take longer than the idle bound). Records
    that wait without the lag changing for ``until_idle_s`` + :data:`ASSIGNMENT_GRACE_S` (a partition whose
    leader is gone, a transaction left open) end the wait with a warning naming them."""

    def __init__(self, sources: list[Source], until_idle_s: float | None) -> None:
        self.sources = [s for s in sources if isinstance(s, Instrumented)]
        self.until_idle_s = until_idle_s
        self.started = self.last_record = time.monotonic()
        self._unread: dict[tuple[str, int], int | None] = {}
        self._unread_since = self.started
        self._warned = False  # in a group, a worker idle past the bound asks every turn until all are
        self.never_assigned = False  # it ended because a source's group never gave it a partition

    def saw_records(self, now: float) -> None:
        self.last_record = now
        self._unread = {}

    def expired(self, now: float) -> bool:
        if self.until_idle_s is None:
            return False
        since = self.last_record
        for source in self.sources:
            if source.assigned_at is None:
                if now - self.started < self.until_idle_s + ASSIGNMENT_GRACE_S:
                    return False
                self._warn_once("no partitions were assigned within %.0f s; stopping", now - self.started)
                self.never_assigned = True
                return True
            since = max(since, source.assigned_at)
        if now - since < self.until_idle_s:
            return False
        unread = self._records_unread()
        if unread != self._unread:  # records arrived or were read meanwhile: the wait starts again
            self._unread, self._unread_since, self._warned = unread, now, False
        if not unread:
            return True
        if now - self._unread_since < self.until_idle_s + ASSIGNMENT_GRACE_S:
            return False
        waited = now - self._unread_since
        self._warn_once("records waited unread for %.0f s without progress, stopping: %s", waited, unread)
        return True

    def _warn_once(self, message: str, *args: object) -> None:
        if not self._warned:
            log.warning(message, *args)
            self._warned = True

    def _records_unread(self) -> dict[tuple[str, int], int | None]:
        """Per assigned partition with records its consumer has not read, how many (None: not known yet, as in
        the first second after an assignment)."""
        unread = {}
        for source in self.sources:
            lag = source.lag()
            for key in source.assignment():
                if lag.get(key, None) != 0:
                    unread[key] = lag.get(key)
        return unread
