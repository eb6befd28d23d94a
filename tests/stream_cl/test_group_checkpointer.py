"""What a group's checkpoint keeps when the workers' gathered offsets name the same partition in one step, and
when the group goes idle."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from consumers.record import Position
from consumers.source import next_offsets
from stream_cl.checkpoint import CheckpointStore
from stream_cl.checkpointer import Checkpointer
from stream_cl.group import GroupCheckpointer
from stream_cl.learner import RunState
from stream_cl.summary import Summary


class _Gathered:
    """Rank 0 of a group whose all-gather returns what each worker reported (here: ``reports``, in rank order)."""

    rank = 0
    sync = "allreduce"
    averaged = True  # every step holds one model (synchronous all-reduce)

    def __init__(self, reports: list) -> None:
        self.reports = reports
        self.gathers = self.settled = 0

    def settle(self, learner: object) -> None:
        self.settled += 1
        self.averaged = True

    def gather_json(self, value: dict) -> list[dict]:
        self.gathers += 1
        return [{**value, "offsets": o, "within": w} for o, w in self.reports]


def _reports(*positions: list[Position]) -> list:
    out = []
    for ps in positions:
        offsets = next_offsets(ps)
        out.append(([[t, p, o] for (t, p), o in offsets.items()], [[t, p, n] for (t, p), n in offsets.within.items()]))
    return out


def _step(tmp_path: Path, reports: list) -> Checkpointer:
    inner = Checkpointer(CheckpointStore(tmp_path), identity={})
    GroupCheckpointer(_Gathered(reports), inner).step(RunState(), {}, 1, Summary())
    inner.finish(RunState(), Summary())
    return inner


def test_a_partition_named_by_two_workers_keeps_the_furthest_position_with_its_own_within(tmp_path: Path) -> None:
    # rank 0 learned 2 of the 5 samples of message 7; rank 1 (the partition's next owner) all of message 7
    partly = [Position("t", 0, 7, 0, 5), Position("t", 0, 7, 1, 5)]
    whole = [Position("t", 0, 7, i, 5) for i in range(5)]
    inner = _step(tmp_path / "a", _reports(partly, whole))
    assert dict(inner.offsets) == {("t", 0): 8} and inner.offsets.within == {}  # not 8 with 2 of its samples done
    # the same in the other rank order: the furthest position wins, not the higher rank
    inner = _step(tmp_path / "b", _reports(whole, partly))
    assert dict(inner.offsets) == {("t", 0): 8} and inner.offsets.within == {}
    # a partly learned message further on is kept with its within
    further = [Position("t", 0, 8, 0, 3)]
    inner = _step(tmp_path / "c", _reports(further, whole))
    assert dict(inner.offsets) == {("t", 0): 8} and inner.offsets.within == {("t", 0): 1}


class _Learner:
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(2)}


def _written(store: CheckpointStore, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while not store.list() and time.monotonic() < deadline:
        time.sleep(0.01)
    return [store.load(info)["offsets"] for info in store.list()]


def test_an_idle_turn_writes_the_due_checkpoint_of_the_groups_last_step_without_a_collective(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, layout=None)
    group = _Gathered(_reports([Position("t", 0, 4, 0, 1)]))
    checkpointer = GroupCheckpointer(group, Checkpointer(store, identity={}, every_seconds=0.2))
    state = RunState(_Learner(), (2,), np.dtype(np.float32))
    checkpointer.step(state, {}, 1, Summary())  # the last step before the stream went quiet: not due yet
    time.sleep(0.2)
    checkpointer.tick(state, Summary())  # an idle turn, due now
    assert _written(store, 5) == [[["t", 0, 5]]] and group.gathers == 1
    checkpointer.inner.finish(state, Summary())


def test_an_idle_turn_after_a_step_without_an_average_averages_and_writes_the_due_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, layout=None)
    group = _Gathered(_reports([Position("t", 0, 4, 0, 1)]))
    group.sync = "average"
    checkpointer = GroupCheckpointer(group, Checkpointer(store, identity={}, every_seconds=0.2))
    state = RunState(_Learner(), (2,), np.dtype(np.float32))
    checkpointer.step(state, {}, 1, Summary())  # an averaging step: gathered
    group.averaged = False  # then a step without an average: the workers' models differ
    checkpointer.step(state, {("t", 0): 9}, 4, Summary())
    assert group.gathers == 1  # no checkpoint of that step: it is no one model
    group.reports = _reports([Position("t", 0, 8, 0, 1)])
    time.sleep(0.2)
    checkpointer.tick(state, Summary())  # the stream went quiet: the group averages, then the due write
    assert group.settled == 1 and group.gathers == 2
    assert _written(store, 5) == [[["t", 0, 9]]]
    checkpointer.tick(state, Summary())  # the next quiet turn: averaged already, nothing more to gather
    assert group.settled == 1 and group.gathers == 2
    checkpointer.inner.finish(state, Summary())


def test_a_quiet_turn_before_anything_is_learned_writes_no_checkpoint(tmp_path: Path) -> None:
    """A restored group averages on its first quiet turn (its workers have not averaged yet): nothing was learned,
    so no copy of the restored checkpoint is written and nothing counts as unsaved."""
    store = CheckpointStore(tmp_path, layout=None)
    group = _Gathered([([], []), ([], [])])
    group.sync, group.averaged = "average", False
    checkpointer = GroupCheckpointer(group, Checkpointer(store, identity={}, every_seconds=0.01))
    state = RunState(_Learner(), (2,), np.dtype(np.float32))
    time.sleep(0.01)  # a checkpoint due by time, were anything unsaved
    checkpointer.tick(state, Summary())
    assert group.settled == 1 and group.gathers == 1
    assert _written(store, 0.3) == [] and checkpointer.inner.unsaved_seconds() == 0.0
    checkpointer.inner.finish(state, Summary())
