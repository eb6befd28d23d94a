"""Several workers learning one stream as one model: the collectives that keep their steps in lockstep.

Each worker runs the ordinary loop on its own partitions (one Kafka consumer group) with the one
shared replay buffer (Redis). ``torch.distributed`` keeps the model one; at every *group step*
every worker makes the same collective calls, in this order, whether or not it polled records:

1. :meth:`Group.agree`: an all-reduce of (polled records, ended, stopping). The group steps only
   when some worker has records, and stops together: when every worker has ended (idle, exhausted
   or at ``max_records``) or any is stopping (SIGTERM). No worker ever waits for one that has nothing.
2. :meth:`Group.share_labels`: the label paths new to the tree, all-gathered and added in one sorted
   order, so the tree and the heads grow identically on every worker even when only one saw a class.
3. The synchronisation, one of :data:`SYNC_MODES`:

   ``allreduce`` (:meth:`Group.reduce`): gradients averaged over the workers that learned
   (synchronous all-reduce, before the step guard, so a non-finite gradient anywhere refuses the
   step everywhere) and the modules' buffers (batch-norm statistics) averaged likewise; then every
   worker takes the same optimizer step. A worker with nothing to learn takes an *empty step* (zero
   gradients), which keeps the optimizer state identical too.

   ``average`` (:meth:`Group.average`): every worker steps its own optimizer on its own records;
   every ``average_every`` group steps the parameters and buffers are averaged over the workers
   that stepped since the last average (all-reduce), so they are identical after it. A worker with
   nothing to learn takes no step and only joins the average. Optimizer state stays per worker.
4. :class:`GroupCheckpointer`: every worker's next offsets and outcome counts, all-gathered, so
   rank 0 writes checkpoints holding every partition's offset at the same step (with ``average``,
   only at a step that ended with an average, so a checkpoint is one model).

Before any of this, before any worker opens its source, :meth:`Group.check_restored` fails the group
unless every worker restored the same checkpoint.

Everything exchanged is tensors or JSON; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from consumers.kafka import RunOffsets
from consumers.record import LabelPath
from consumers.source import NextOffsets, Offsets, within_of
from stream_cl.checkpointer import Checkpointer, Restored
from stream_cl.errors import ConfigError, StreamClError
from stream_cl.labels import LabelTree
from stream_cl.learner import Batch, Learner, LearnerFactory, Observation, Prediction, RunState
from stream_cl.summary import COUNTS, TOTALS, Summary

log = logging.getLogger("stream_cl.group")

LOCKSTEP_METHODS = ("er", "onpro", "onpro-hle")
"""Methods that take at most one optimizer step per batch, the unit the group synchronises."""

SYNC_MODES = ("allreduce", "average")
"""How a group keeps its model one: gradients all-reduced every step, or parameters averaged every K steps."""


class ModelMismatchError(StreamClError):
    """The workers' models have different sizes, so no collective over them can be made."""


class PeerRestoreError(StreamClError):
    """Another worker of the group could not restore its checkpoint; trying again helps as much as it would
    have helped that worker."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


@contextmanager
def process_group(backend: str, **init: Any) -> Iterator[None]:
    """The default process group (``torch.distributed.init_process_group(backend, **init)``) for the body.

    On a normal way out every worker first waits for the others (a barrier), so none tears its
    connections down while a peer still completes the last collective; after an error there is no
    barrier (the peers may be gone), only the teardown. The error is logged before it: gloo's teardown
    after a peer left mid-collective can abort the process (std::terminate), which would lose it.
    """
    dist.init_process_group(backend, **init)
    try:
        yield
        dist.barrier()
    except Exception as err:
        log.error("leaving the group after %s: %s", type(err).__name__, err)
        raise
    finally:
        dist.destroy_process_group()


class Group:
    """This worker's view of the group: its rank, the world size, and the collectives of a group step."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        *,
        sync: str = "allreduce",
        average_every: int = 1,
        run_offsets: RunOffsets | None = None,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ConfigError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
        if average_every < 1:
            raise ConfigError(f"average_every must be >= 1, got {average_every}")
        self.rank, self.world_size = rank, world_size
        self.device = device
        """Where collective tensors live: CPU with gloo, the worker's GPU with NCCL."""
        self.sync, self.average_every = sync, average_every
        self.run_offsets = run_offsets
        """Where the workers' Kafka consumers committed in this run (a partition handed over goes on from there)."""
        self.make_learner: LearnerFactory | None = None
        self._shared = self._stepped = False
        self.steps = 0
        """Group steps taken in this run (the same count on every worker)."""
        self.averaged = sync == "allreduce"
        """Whether the workers hold one model after the last group step (always, with ``allreduce``)."""
        self._moved = False  # this worker stepped its optimizer since the last average

    @classmethod
    def current(
        cls, *, sync: str = "allreduce", average_every: int = 1, run_offsets: RunOffsets | None = None
    ) -> Group:
        """The initialised default process group of this process."""
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        return cls(rank, world_size, device, sync=sync, average_every=average_every, run_offsets=run_offsets)

    def wrap(self, make_learner: LearnerFactory) -> LearnerFactory:
        """The factory of learners that take part in group steps (the inner factory builds the method)."""

        def make(shape: tuple[int, ...], dtype: np.dtype) -> Learner:
            return GroupLearner(make_learner(shape, dtype), self, shape, dtype)

        self.make_learner = make
        return make

    # -- 1. agreement ----------------------------------------------------------------------------
    def agree(self, polled: int, ended: bool, stopping: bool) -> tuple[bool, bool]:
        """``(stop, step)`` for the whole group, from this worker's polled count and local end and stop."""
        flags = torch.tensor([int(polled > 0), int(ended), int(stopping)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flags)
        with_records, n_ended, n_stopping = flags.tolist()
        self._shared = self._stepped = False
        stop = n_stopping > 0 or (with_records == 0 and n_ended == self.world_size)
        return stop, with_records > 0 and not stop

    def finish_step(self, state: RunState) -> None:
        """Make this worker's missing collectives of a group step: build the learner if the group has
        one and this worker does not yet (its partitions had no record so far), share no labels, take
        an empty step."""
        if not self._shared:
            shape = None if state.learner is None else [list(state.input_shape), str(state.input_dtype)]
            gathered = self._share(state.learner, [], shape)
            if state.learner is None:
                known = next((g["shape"] for g in gathered if g["shape"] is not None), None)
                if known is None:
                    return  # no worker has a learner: every record of this step was screened out
                state.input_shape, state.input_dtype = tuple(known[0]), np.dtype(known[1])
                state.learner = self.make_learner(state.input_shape, state.input_dtype)
            self._grow(state.learner, gathered)
            self._align(state.learner)
        self.steps += 1
        if self.sync == "average":
            self.averaged = self.steps % self.average_every == 0
            if self.averaged:
                self.average(state.learner)
        elif not self._stepped:
            self.empty_step(state.learner)

    # -- 2. labels -------------------------------------------------------------------------------
    def share_labels(self, learner: GroupLearner, paths: Sequence[LabelPath | None]) -> None:
        """All-gather the paths of ``paths`` new to the tree and add every worker's, in sorted order
        (once a step: the run loop's screening shares them, before ``observe`` would)."""
        if self._shared:
            return
        shape = [list(learner.record_shape), str(learner.record_dtype)]
        self._grow(learner, self._share(learner, paths, shape))
        self._align(learner)

    def _align(self, learner: GroupLearner) -> None:
        """Give a learner new to the group, or with new heads, rank 0's parameters and buffers (every
        worker builds its learner and grows its heads in the same group step, so this broadcast is a
        collective they all make). With ``average``, the workers' parameters are averaged instead, so
        the steps they took since the last average are kept (a new learner has taken none: rank 0's)."""
        if learner.aligned:
            return
        if self.sync == "average":
            self.average(learner)
            return
        tensors = list(learner.inner.model.state_dict().values())
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        self._check_size(flat.numel())
        dist.broadcast(flat, 0)
        _unflatten(flat, tensors)
        learner.aligned = True

    def _share(self, learner: Learner | None, paths: Sequence[LabelPath | None], shape: list | None) -> list[dict]:
        tree = None if learner is None else learner.labels
        new = sorted({p for p in paths if p is not None and (tree is None or tree.lookup(p)[0] < 0)})
        self._shared = True
        return self.gather_json({"paths": [list(p) for p in new], "shape": shape})

    def _grow(self, learner: GroupLearner, gathered: list[dict]) -> None:
        inner = learner.inner
        union = sorted({tuple(p) for g in gathered for p in g["paths"]}, key=lambda p: (len(p), p))
        fresh = [p for p in union if inner.labels.lookup(p)[0] < 0]
        accepted = [p for p, problem in zip(fresh, inner.labels.problems(fresh), strict=True) if problem is None]
        if accepted:
            inner.labels.encode(accepted)
            inner.model.sync(inner.optimizer)
            learner.aligned = False  # the new heads' rows were initialised by each worker's own RNG

    # -- 3. gradients ----------------------------------------------------------------------------
    def reduce(
        self, params: list[torch.Tensor], modules: Sequence[torch.nn.Module], loss: torch.Tensor
    ) -> torch.Tensor:
        """Average gradients and buffers over the workers that learned this step; returns the loss
        summed over the group (non-finite if any worker's is), for the step guard's check."""
        learned = 0.0 if self._empty else 1.0
        self._stepped = True
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buffers = [b for m in modules for b in m.buffers()]
        tensors = [p.grad for p in params] + buffers
        self._check_size(sum(t.numel() for t in tensors))
        # Built on the collective device and cast there: the loss's may have no float64 (MPS).
        learned_here = torch.tensor([learned], dtype=torch.float64, device=self.device)
        head = torch.cat([learned_here, loss.detach().reshape(1).to(self.device, torch.float64)])
        dist.all_reduce(head)
        n_learned, loss_sum = head.tolist()
        # Every worker's tensors, in one flat all-reduce; a worker that did not learn contributes zeros.
        weight = 1.0 if n_learned == 0 else learned  # nobody learned: every worker's buffers count equally
        divisor = self.world_size if n_learned == 0 else n_learned
        if tensors:
            flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
            flat[sum(p.numel() for p in params) :] *= weight
            dist.all_reduce(flat)
            _unflatten(flat / divisor, tensors)
        return torch.tensor(loss_sum, device=loss.device)

    def empty_step(self, learner: GroupLearner) -> None:
        """This worker's part of a step it has nothing to learn in: zero gradients, the group's update."""
        inner = learner.inner
        inner.optimizer.zero_grad(set_to_none=True)
        inner.guard.begin()
        self._empty = True
        try:
            inner.guard.step(torch.zeros((), device=inner.model.device), inner.optimizer)
        finally:
            self._empty = False

    _empty = False

    def average(self, learner: GroupLearner | None) -> None:
        """Average parameters and buffers over the workers that stepped since the last average (rank 0's
        when none did and the learner is new or has new heads), so every worker holds the same model.
        A collective; ``learner`` is None on every worker or on none (learners are built in one step)."""
        if learner is None:
            return
        tensors = _model_tensors(learner.inner)
        self._check_size(sum(t.numel() for t in tensors))
        counted = torch.tensor([float(self._moved)], device=self.device)
        dist.all_reduce(counted)
        n_moved = counted.item()
        if n_moved == 0 and learner.aligned:
            return  # nobody stepped since the last average: the workers hold one model already
        weight, divisor = (float(self._moved), n_moved) if n_moved else (float(self.rank == 0), 1.0)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors]) * weight
        dist.all_reduce(flat)
        _unflatten(flat / divisor, tensors)
        self._moved = False
        learner.aligned = True

    def _check_size(self, size: int) -> None:
        """Raise :class:`ModelMismatchError` on every worker unless every worker's model has ``size`` elements;
        a collective. Mismatched tensors in one all-reduce abort gloo (no message) and NCCL may reduce them
        silently. One MAX all-reduce of (size, -size) gives the group's largest and smallest sizes."""
        extremes = torch.tensor([size, -size], dtype=torch.int64, device=self.device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        largest, negated_smallest = extremes.tolist()  # one device-to-host copy
        smallest = -negated_smallest
        if largest != smallest:
            raise ModelMismatchError(
                f"the workers' models differ: this worker's has {size} elements, the group's from {smallest} "
                f"to {largest} (different settings, or a label tree grown apart)"
            )

    def moved(self) -> None:
        """This worker stepped its optimizer (in ``average`` mode, its parameters left the group's)."""
        self._moved = True

    def settle(self, learner: Learner | None) -> None:
        """Average once more if any worker stepped since the last average (``average`` mode), so the run
        ends with one model; a collective every worker makes at its end. Nothing with ``allreduce``."""
        if self.sync == "average" and not self.averaged:
            self.average(learner)
            self.averaged = True

    # -- 4. checkpoints and summaries ------------------------------------------------------------
    def check_restored(self, restored: Restored | None) -> None:
        """Raise ConfigError on every worker unless every worker restored the same checkpoint (or none); a
        collective, made before any worker opens its source. Each worker restores on its own, and opening the
        source seeks (and commits) its partitions to the restored offsets, while the model learned is rank 0's:
        a worker that restored an older checkpoint (a directory not shared, a stale network-file-system cache,
        a read error that skipped the newest file) would learn records twice, and one with none from the start."""
        mine = None if restored is None else [restored.id, _resume_point(restored)]
        gathered = self.gather_json(mine)
        failed = [(rank, g) for rank, g in enumerate(gathered) if isinstance(g, dict)]
        if failed:
            rank, failure = failed[0]
            message = f"rank {rank} could not restore its checkpoint: {failure['error']}"
            raise PeerRestoreError(message, retriable=failure["retriable"])
        if all(g == gathered[0] for g in gathered):
            return
        restored_by = ", ".join(
            f"rank {rank}: " + ("no checkpoint" if g is None else f"checkpoint {g[0]} (resume point {g[1]})")
            for rank, g in enumerate(gathered)
        )
        raise ConfigError(
            f"the workers restored different checkpoints ({restored_by}): every worker must read the one "
            "--checkpoint-dir (storage every machine sees, without stale caches); no worker opened its source"
        )

    def restore_failed(self, err: Exception) -> None:
        """This worker's restore raised ``err``: tell the peers waiting in :meth:`check_restored`, so they fail
        with its reason at once instead of a collective's timeout or a closed connection."""
        retriable = not isinstance(err, StreamClError) or err.retriable
        self.gather_json({"error": f"{type(err).__name__}: {err}", "retriable": retriable})

    def gather_json(self, value: Any) -> list[Any]:
        """Every worker's ``value`` (JSON-serialisable), in rank order."""
        data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=self.device)
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: len(data)] = data
        out = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [json.loads(bytes(o[: int(s)].cpu().tolist())) for o, s in zip(out, sizes, strict=True)]

    def summarize(self, summary: Summary, learner: Learner | None) -> Summary:
        """The group's summary (on every worker): counts and totals summed over workers, ``workers`` per rank.

        Accuracies, classes and timings stay this worker's own.
        """
        self.settle(learner)
        mine = {
            "rank": self.rank,
            "learned": summary.learned,
            "model_sha256": model_sha256(learner),
            "counts": {name: summary.count(name) for name in COUNTS if name != "dead_letter"},
            "dead_letter": summary.dead_letter,
        }
        gathered = self.gather_json(mine)
        merged = merge_counts(summary, gathered)
        # The history before this run (from the restored checkpoint) is the same on every worker.
        merged.set_totals({total: getattr(summary, total) - summary.count(name) for name, total in TOTALS.items()})
        merged.world_size = self.world_size
        merged.workers = [{k: g[k] for k in ("rank", "learned", "model_sha256")} for g in gathered]
        return merged


class GroupLearner:
    """A learner taking part in group steps: labels shared before it learns, gradients averaged by the group."""

    def __init__(self, inner: Learner, group: Group, record_shape: tuple[int, ...], record_dtype: np.dtype) -> None:
        if not hasattr(inner, "guard") or not hasattr(inner, "optimizer"):
            raise ConfigError(f"method {inner.name} cannot learn in a group of workers")
        self.inner, self.group = inner, group
        modules = inner.guard.modules

        def reduce(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
            return group.reduce(params, modules, loss)

        if group.sync == "allreduce":
            inner.guard.reduce = reduce
        if getattr(inner.buffer, "classes", None) is not None:
            inner.buffer.classes = KnownClasses(inner.labels)
        self.record_shape, self.record_dtype = record_shape, record_dtype
        self.aligned = False
        """Whether it holds the group's parameters (rank 0's are broadcast at its first group step)."""

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def labels(self) -> Any:
        return SharedLabels(self)

    @property
    def buffer(self) -> Any:
        return self.inner.buffer

    def observe(self, batch: Batch) -> Observation:
        self.group.share_labels(self, batch.labels)
        observation = self.inner.observe(batch)
        if observation.stats.loss is not None:  # it stepped its optimizer (``average`` weighs by this)
            self.group.moved()
        return observation

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.inner.predict(x)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # model, optimizer ... of the method, for exports and probes
        return getattr(self.inner, name)


class SharedLabels:
    """A group learner's label tree as the run loop screens a batch with it: :meth:`problems` first shares
    the batch's new paths with the group, so every path is judged against the tree all workers grew alike.

    Two workers that bring one class with two parents in one step: the group adds the path first in
    sorted order (on every worker), and the other is a ``label_conflict`` dead letter on its worker,
    as two such paths in one batch are for a single learner. Everything else is the tree's own.
    """

    def __init__(self, learner: GroupLearner) -> None:
        self._learner = learner

    def problems(self, paths: Sequence[LabelPath | None]) -> list[str | None]:
        self._learner.group.share_labels(self._learner, paths)
        return self._learner.inner.labels.problems(paths)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._learner.inner.labels, name)


class KnownClasses:
    """A group worker's class numbering as its shared (Redis) replay buffer sees it: only the classes its
    tree has. A draw may hold a class the group has not added (another learner's, or one learned after
    the checkpoint a restarted group resumed from); added to this worker's tree alone it would give the
    worker other heads than its peers', and the group's next gradient all-reduce would not match. Such
    samples are left out of the draw instead; once the group adds the class, draws include them again.
    """

    def __init__(self, tree: LabelTree) -> None:
        self._tree = tree

    def path(self, level: int, index: int) -> LabelPath:
        return self._tree.path(level, index)

    def lookup(self, path: LabelPath) -> tuple[int, int]:
        return self._tree.lookup(path)

    def encode(self, paths: Sequence[LabelPath | None]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        known = [(-1, -1) if path is None else self._tree.lookup(path) for path in paths]
        level, y = np.array(known, dtype=np.int64).reshape(-1, 2).T
        return level.copy(), y.copy(), []


class GroupCheckpointer:
    """Checkpoints of a group: every worker's offsets and counts gathered at each step where the workers
    hold one model (every step with ``allreduce``, each averaging step with ``average``); rank 0 writes."""

    def __init__(self, group: Group, inner: Checkpointer) -> None:
        self.group, self.inner = group, inner
        self._last: list[dict] = []
        self._offsets: Offsets = {}  # this worker's, since the last gather
        self._within: dict[tuple[str, int], int] = {}  # samples done of the message at each next offset
        self._records = 0

    @property
    def base_totals(self) -> dict[str, int]:
        return self.inner.base_totals

    @property
    def version(self) -> int:
        return self.inner.version

    def step(self, state: RunState, offsets: Offsets, n_records: int, summary: Summary) -> None:
        self._offsets.update(offsets)
        for partition in offsets:  # a newer offset ends or replaces the partly done message of before
            self._within.pop(partition, None)
        self._within.update(within_of(offsets))
        self._records += n_records
        if not self.group.averaged:
            return  # the workers' models differ until the next average: no checkpoint would be one model
        mine = {
            "offsets": [[t, p, o] for (t, p), o in sorted(self._offsets.items())],
            "within": [[t, p, n] for (t, p), n in sorted(self._within.items())],
            "records": self._records,
            "counts": {name: summary.count(name) for name in COUNTS if name != "dead_letter"},
            "dead_letter": summary.dead_letter,
        }
        self._offsets, self._within, self._records = {}, {}, 0
        self._last = self.group.gather_json(mine)
        if self.group.rank == 0:
            every = _furthest(self._last)
            total = sum(g["records"] for g in self._last)
            if every or total:  # a quiet turn's average of nothing learned (a restored model) saves nothing new
                self.inner.step(state, every, total, merge_counts(summary, self._last))

    def tick(self, state: RunState, summary: Summary) -> None:
        """A turn the group agreed not to step: rank 0 writes a due checkpoint of the last gathered step.

        No collective (only rank 0's cadence knows whether one is due): the model has not moved since
        that gather, so its offsets still pair with it. With ``average`` after a step without an
        average, every worker (all take this turn) first averages, as at the end of a run: else the
        learning before a quiet stream would stay in no checkpoint until the stream resumed.
        """
        if self.group.sync == "average" and not self.group.averaged and state.learner is not None:
            self.group.settle(state.learner)
            self.step(state, {}, 0, summary)  # gathers what was learned since the last average; writes if due
            return
        if self.group.rank == 0 and self.group.averaged and self._last:
            self.inner.tick(state, merge_counts(summary, self._last))

    def finish(self, state: RunState, summary: Summary) -> Any:
        if self.group.sync == "average":  # one model at the end, and the offsets learned since the last average
            self.group.settle(state.learner)
            self.step(state, {}, 0, summary)
        if self.group.rank != 0:  # it never wrote: this only stops its writer thread
            return self.inner.finish(state, summary)
        return self.inner.finish(state, merge_counts(summary, self._last) if self._last else summary)


def _model_tensors(learner: Any) -> list[torch.Tensor]:
    """What makes a learner's model: the model's parameters and buffers, the optimizer's parameters and
    the step guard's modules' buffers (a projector of OnPro), each once."""
    tensors = list(learner.model.state_dict(keep_vars=True).values())
    tensors += [p for group in learner.optimizer.param_groups for p in group["params"]]
    tensors += [b for m in learner.guard.modules for b in m.buffers()]
    unique = {id(t): t for t in tensors}
    return [t.data for t in unique.values()]


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` (float64) into ``tensors``, rounding for integer ones."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            part = flat[offset : offset + t.numel()].view_as(t)
            t.copy_(part if t.is_floating_point() else part.round())
            offset += t.numel()


def _furthest(gathered: list[dict]) -> NextOffsets:
    """Per partition, the furthest position any worker reported, with that worker's own ``within``: two workers
    name one partition in a step when it changed owner, and a ``within`` paired with another worker's offset
    would make a restart skip samples never learned."""
    every = NextOffsets()
    for g in gathered:
        within = {(t, p): n for t, p, n in g["within"]}
        for t, p, o in g["offsets"]:
            key = (t, p)
            if key not in every or (o, within.get(key, 0)) > (every[key], every.within.get(key, 0)):
                every[key] = o
                every.within.pop(key, None)
                if key in within:
                    every.within[key] = within[key]
    return every


def _resume_point(restored: Restored) -> str:
    """A short digest of where a restored checkpoint resumes (offsets, partly learned messages, totals): two
    checkpoints with one id but different contents (two directories) differ in it."""
    point = {
        "offsets": sorted([t, p, o] for (t, p), o in restored.offsets.items()),
        "within": sorted([t, p, n] for (t, p), n in restored.offsets.within.items()),
        "totals": restored.totals,
    }
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]


def merge_counts(summary: Summary, gathered: list[dict]) -> Summary:
    """A copy of ``summary`` whose outcome counts are the sums of every worker's."""
    merged = Summary(**vars(summary))
    for name in COUNTS:
        if name == "dead_letter":
            merged.dead_letter = {}
            for g in gathered:
                for reason, n in g["dead_letter"].items():
                    merged.dead_letter[reason] = merged.dead_letter.get(reason, 0) + n
        else:
            setattr(merged, name, sum(g["counts"][name] for g in gathered))
    return merged


def model_sha256(learner: Learner | None) -> str:
    """SHA-256 over the model's tensors in state-dict order ("" without a learner)."""
    if learner is None:
        return ""
    digest = hashlib.sha256()
    for tensor in learner.model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
