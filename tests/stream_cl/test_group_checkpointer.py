"""What a group's checkpoint keeps when the workers' gathered offsets name the same partition in one step."""

from __future__ import annotations

from pathlib import Path

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
    averaged = True  # every step holds one model (synchronous all-reduce)

    def __init__(self, reports: list) -> None:
        self.reports = reports

    def gather_json(self, value: dict) -> list[dict]:
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
