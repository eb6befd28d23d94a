"""When a run checkpoints and what goes in; restoring a run from its newest valid checkpoint.

A checkpoint pairs the learner's state with the source offsets that state has learned up to, so
a restart that seeks there neither skips a record nor learns one twice. State is copied on the
loop thread at a batch boundary (cheap tensor copies); serialising, fsync and rename happen on a
background thread so the loop keeps learning meanwhile.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from consumers.source import NextOffsets, Offsets
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeSet
from stream_cl.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore
from stream_cl.errors import ConfigError
from stream_cl.learner import LearnerFactory, RunState
from stream_cl.summary import Summary

log = logging.getLogger("stream_cl.checkpoint")


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restart resumes from: checkpoint id, next offsets per (topic, partition), and the outcome
    totals (``consumed_total``, ``learned_total``, ...; see ``stream_cl.summary``) up to those offsets."""

    id: int
    offsets: NextOffsets
    """Next offsets, and in ``offsets.within`` the samples already learned of a message learned in part."""
    totals: dict[str, int]
    pending: dict[str, Any] | None = None
    """The delayed-label stores (``DelayedLabels.state_dict``), if the run had them."""

    @property
    def learned_total(self) -> int:
        return self.totals.get("learned_total", 0)


@dataclass(slots=True)
class _Write:
    """A checkpoint write in flight, and what the cadence goes back to if it fails."""

    future: Future
    records: int  # polled records it holds that no earlier checkpoint does
    last: float  # the cadence's start before it
    unsaved_since: float | None  # when the oldest learning it saves first began


class Checkpointer:
    """Checkpoints a run every ``every_records`` polled records and every ``every_seconds`` seconds.

    One write at a time, and the loop never waits for it: a checkpoint that comes due while the previous
    write is still in progress (a slow disk) stays due, and is taken at the first batch or idle turn
    (:meth:`tick`) after that write is done. A write that fails leaves the cadence as if it had not been
    attempted, and is tried again after a back-off that doubles from :attr:`RETRY_FIRST_S` up to
    ``every_seconds``, at most :attr:`RETRY_MAX_S`, so a full disk does not cost every batch a
    snapshot; ``streamcl_checkpoint_age_seconds`` keeps counting from the oldest learning not yet saved.

    Parameters
    ----------
    store
        Where checkpoints go.
    identity
        What the learner is (method, model, width); stored, and checked on restore.
    every_records, every_seconds
        Cadence (None: never for that reason; the final checkpoint is always written).
    restored
        The checkpoint this run resumed from, whose offsets and counters it extends.
    metrics
        Receives ``streamcl_checkpoint_age_seconds``.
    probe
        The run's probe set, checkpointed too, so accuracy and forgetting continue across restarts.
    accuracy
        The run's prequential accuracy, whose windows are checkpointed too, so the online accuracy gauges
        go on after a restart as if it had not happened.
    pending
        The delayed-label stores (``state_dict``; ``saved`` once a checkpoint holding it is written),
        checkpointed with the learner and both topics' offsets, so a restart neither loses a waiting
        sample nor learns one twice.
    """

    RETRY_FIRST_S = 1.0
    """Wait before trying a failed write again; it doubles with every failure in a row."""
    RETRY_MAX_S = 60.0
    """Longest wait between tries of a failed write (a disk freed is used within it)."""

    def __init__(
        self,
        store: CheckpointStore,
        *,
        identity: Mapping[str, Any],
        every_records: int | None = None,
        every_seconds: float | None = None,
        restored: Restored | None = None,
        metrics: Metrics | None = None,
        probe: ProbeSet | None = None,
        accuracy: PrequentialAccuracy | None = None,
        pending: Any = None,
    ) -> None:
        if every_records is not None and every_records <= 0:
            raise ValueError(f"every_records must be > 0, got {every_records}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {every_seconds}")
        self.store = store
        self.probe = probe
        self.accuracy = accuracy
        self.pending = pending
        self.identity = dict(identity)
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.offsets = NextOffsets(restored.offsets if restored else None)
        self.base_totals: dict[str, int] = dict(restored.totals) if restored else {}
        """Outcome totals of the model's history before this run (see ``Summary.totals``)."""
        self.version = restored.id if restored else 0
        """Id of the newest checkpoint written (or restored): the model version predictions carry."""
        self._since = 0  # polled records no checkpoint written or in flight holds
        self._last = time.monotonic()  # of the last submitted write that has not failed: the cadence
        self._unsaved_since: float | None = None  # when the oldest learning no checkpoint written or in flight began
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._write_in_flight: _Write | None = None
        self._failures = 0  # failed writes in a row
        self._backoff = 0.0  # the wait after the last of them
        self._retry_at = float("-inf")  # monotonic time before which a failed write is not tried again
        self._lock = threading.Lock()  # the metric reads what is unsaved from the scrape thread
        if metrics is not None:  # computed at scrape time: it grows while writes fail, and is 0 when all is saved
            metrics.checkpoint_age.set_function(self.unsaved_seconds)

    def unsaved_seconds(self) -> float:
        """How long the oldest record learned but not yet in a written checkpoint has waited (0: none)."""
        with self._lock:
            times = [self._unsaved_since]
            write = self._write_in_flight
            if write is not None and not _succeeded(write.future):  # failed or still writing: not saved yet
                times.append(write.unsaved_since)
        oldest = min((t for t in times if t is not None), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def step(self, state: RunState, offsets: Offsets, n_records: int, summary: Summary) -> None:
        """Record a committed batch (its next ``offsets``); checkpoint if one is due."""
        self.offsets.advance(offsets)
        self._since += n_records
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
        self.tick(state, summary)

    def tick(self, state: RunState, summary: Summary) -> None:
        """Checkpoint what is unsaved if a checkpoint is due, the previous write is done and no back-off
        holds it; never waits for a write. The run loop calls it on idle turns too, so learning just
        before a stream goes quiet is saved on time, not with the next record."""
        write = self._write_in_flight
        if write is not None:
            if not write.future.done():
                return  # a slow disk: the loop learns on, and the checkpoint stays due until the write is done
            self._settle()  # a failed write puts the cadence back, so the check below retries it
        now = time.monotonic()
        if self._unsaved_since is None or state.learner is None or now < self._retry_at:
            return
        due = (self.every_records is not None and self._since >= self.every_records) or (
            self.every_seconds is not None and now - self._last >= self.every_seconds
        )
        if due:
            self._submit(state, summary)

    def finish(self, state: RunState, summary: Summary) -> CheckpointInfo | None:
        """Write a final checkpoint if anything was processed since the last one written; wait for it.

        Raises the final write's error (what an earlier failed write held is in the final one too).
        """
        info = self._settle()
        if state.learner is not None and self._since:
            self._submit(state, summary)
            info = self._wait()
        self._pool.shutdown()
        return info

    def _submit(self, state: RunState, summary: Summary) -> None:
        """Start writing a checkpoint of ``state``; the previous write must be settled (one at a time)."""
        totals = summary.totals(self.base_totals)
        payload = {
            "identity": dict(self.identity),
            "input_shape": list(state.input_shape),
            "input_dtype": str(state.input_dtype),
            "offsets": [[topic, partition, offset] for (topic, partition), offset in sorted(self.offsets.items())],
            # samples of the message at that offset already learned (wire format 2), where it was learned in part
            "within": [[topic, partition, n] for (topic, partition), n in sorted(self.offsets.within.items())],
            "learned_total": totals["learned_total"],
            "totals": totals,
            "learner": _snapshot(state.learner.state_dict()),
            "probe": None if self.probe is None else _snapshot(self.probe.state_dict()),
            "accuracy": None if self.accuracy is None else _snapshot(self.accuracy.state_dict()),
            "pending": None if self.pending is None else _snapshot(self.pending.state_dict()),
        }
        future = self._pool.submit(self._write, payload)
        with self._lock:
            self._write_in_flight = _Write(future, self._since, self._last, self._unsaved_since)
            self._since, self._last, self._unsaved_since = 0, time.monotonic(), None

    def _write(self, payload: dict[str, Any]) -> CheckpointInfo:
        info = self.store.write(payload)
        if payload["pending"] is not None:  # the delayed-label store may drop what only older checkpoints needed
            self.pending.saved(payload["pending"])
        return info

    def _settle(self) -> CheckpointInfo | None:
        """:meth:`_wait`, logging a failed write instead of raising (a due check retries it after the back-off):
        its traceback for the first of failures in a row, then one line each, so a full disk does not flood the log."""
        try:
            return self._wait()
        except Exception as err:
            if self._failures == 1:
                log.exception("checkpoint write failed; trying again in %.3g s", self._backoff)
            else:
                log.warning(
                    "checkpoint write failed again (%d in a row): %s; trying again in %.3g s",
                    self._failures,
                    err,
                    self._backoff,
                )
            return None

    def _wait(self) -> CheckpointInfo | None:
        """The outcome of the write in flight, once it is done; a failed one raises, its records, time and
        learning back in the cadence as if it had not been attempted, and the next try backed off."""
        write = self._write_in_flight
        if write is None:
            return None
        try:
            info = write.future.result()
        except Exception:
            with self._lock:
                self._since += write.records
                self._last = write.last
                waiting = [t for t in (write.unsaved_since, self._unsaved_since) if t is not None]
                self._unsaved_since = min(waiting, default=None)
                self._write_in_flight = None
            self._failures += 1
            cap = min(self.every_seconds or self.RETRY_MAX_S, self.RETRY_MAX_S)  # a disk freed is used soon
            self._backoff = min(cap, self.RETRY_FIRST_S if self._failures == 1 else 2 * self._backoff)
            self._retry_at = time.monotonic() + self._backoff
            raise
        with self._lock:
            self._write_in_flight = None
        self._failures, self._retry_at = 0, float("-inf")
        self.version = info.id
        log.info("checkpoint %d written (%d bytes)", info.id, info.size)
        return info


def restore(
    store: CheckpointStore,
    make_learner: LearnerFactory,
    identity: Mapping[str, Any],
    probe: ProbeSet | None = None,
    accuracy: PrequentialAccuracy | None = None,
) -> tuple[RunState, Restored | None]:
    """A run state rebuilt from the newest valid checkpoint (an empty one if the directory holds none);
    ``probe`` gets the checkpoint's probe set back, ``accuracy`` its online accuracy windows. The configured
    optimizer hyper-parameters (``--hparam lr=...``) replace the checkpoint's, except a learning rate the
    method schedules itself.

    Raises
    ------
    ConfigError
        If the checkpoint holds another method or model than ``identity`` asks for, or a learner or probe
        state that the configured ones cannot load (another buffer policy, another version's state).
    CheckpointError
        If the directory holds checkpoints but none loads (:meth:`CheckpointStore.latest`), or the newest
        holds a value no run writes (an unknown input dtype, a negative offset).
    """
    found = latest_of(store, identity)
    if found is None:
        return RunState(), None
    info, payload = found
    where = f"checkpoint {info.id} in {store.directory}"
    try:
        if not all(map(_is_count, payload["input_shape"])):
            raise ValueError(f"input_shape {payload['input_shape']!r} is not a list of ints >= 0")
        shape, dtype = tuple(payload["input_shape"]), np.dtype(payload["input_dtype"])
        offsets = NextOffsets(
            _positions(payload["offsets"], "offsets"), within=_positions(payload.get("within", []), "within")
        )
        # Checkpoints written before the outcome totals existed carry learned_total alone.
        totals = _totals(payload.get("totals") or {"learned_total": payload["learned_total"]})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where} holds an invalid value: {err}") from err
    learner = make_learner(shape, dtype)
    configured = _optimizer_settings(learner)
    try:
        learner.load_state_dict(payload["learner"])
        if probe is not None and payload.get("probe") is not None:
            probe.load_state_dict(payload["probe"])
        if accuracy is not None and payload.get("accuracy") is not None:  # older checkpoints have none
            accuracy.load_state_dict(payload["accuracy"])
    except torch.cuda.OutOfMemoryError:
        raise  # a GPU shared for a moment, not a checkpoint to give up: retriable
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        # a state of other parts (another --buffer-policy) or of another version: not a crash at every restart
        raise ConfigError(
            f"{where} does not fit this configuration ({type(err).__name__}: {err}); start with the options it "
            "was written with (such as --buffer-policy) or use another --checkpoint-dir"
        ) from err
    _apply_optimizer_settings(learner, configured, info.id)
    restored = Restored(info.id, offsets, totals, payload.get("pending"))
    log.info("restored checkpoint %d: %d records learned, offsets %s", info.id, restored.learned_total, offsets)
    return RunState(learner, shape, dtype), restored


def latest_of(store: CheckpointStore, identity: Mapping[str, Any]) -> tuple[CheckpointInfo, dict[str, Any]] | None:
    """The newest checkpoint that loads (None if the directory holds none), if it holds the method and model
    ``identity`` asks for; else :class:`ConfigError`."""
    found = store.latest()
    if found is not None and found[1]["identity"] != dict(identity):
        info, payload = found
        raise ConfigError(
            f"checkpoint {info.id} in {store.directory} is {payload['identity']}, but the service is configured as "
            f"{dict(identity)}; use another --checkpoint-dir or matching options"
        )
    return found


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positions(entries: Any, what: str) -> dict[tuple[str, int], int]:
    """``[[topic, partition, n], ...]`` (next offsets, or samples learned of a message) as a dict."""
    out = {}
    for entry in entries:
        if not (
            isinstance(entry, list | tuple)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and all(map(_is_count, entry[1:]))
        ):
            raise ValueError(f"{what} entry {entry!r} is not [topic, partition >= 0, n >= 0]")
        topic, partition, n = entry
        out[(topic, partition)] = n
    return out


def _totals(totals: Mapping[Any, Any]) -> dict[str, int]:
    if not all(isinstance(k, str) and _is_count(v) for k, v in totals.items()):
        raise ValueError(f"totals {totals!r} are not counts (ints >= 0) by name")
    return dict(totals)


def _optimizer_settings(learner: Any) -> dict[str, Any]:
    """The hyper-parameters of ``learner``'s optimizer as built from the configuration (every group has
    the first one's: grown heads copy it)."""
    optimizer = getattr(learner, "optimizer", None)
    if optimizer is None:
        return {}
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


def _apply_optimizer_settings(learner: Any, configured: Mapping[str, Any], checkpoint_id: int) -> None:
    """Put the configured optimizer hyper-parameters back after a checkpoint's optimizer state loaded.

    A restart with ``--hparam lr=...`` is how a running model gets another rate, so the configuration wins
    over the rate saved with the optimizer; with an unchanged configuration nothing changes. A rate the
    method moves as it learns (ER-HLE's ``lr_decay``, PL-FMS's adaptive rate) is where its schedule stands,
    so the checkpoint's is kept (ER-HLE goes back to the configured one at its next new class).
    """
    if not configured:
        return
    scheduled = getattr(learner, "schedules_lr", False)
    changed = {}
    for group in learner.optimizer.param_groups:
        for key, value in configured.items():
            if group.get(key) != value and not (key == "lr" and scheduled):
                changed[key] = (group.get(key), value)
                group[key] = value
    for key, (saved, value) in changed.items():
        log.info("checkpoint %d: optimizer %s %r replaced by the configured %r", checkpoint_id, key, saved, value)


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _snapshot(value: Any) -> Any:
    """A deep copy with every tensor cloned to CPU, so later training steps cannot change it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return copy.deepcopy(value)
