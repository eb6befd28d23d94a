"""Held-out records pass the checks learned ones do: their classes count toward --max-classes, their label paths
may not contradict the tree (nor block the learned records of their batch), and their inputs are screened; the
probe scores a path only against the class with the same full path."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from itertools import count
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.checkpoint import CheckpointStore
from stream_cl.checkpointer import Checkpointer, restore
from stream_cl.learner import RunState
from stream_cl.publishing import evaluate
from stream_cl.run import RunOptions, RunParts, run_stream
from stream_cl.summary import Summary
from tests.stream_cl.test_run_screen import Collected, _stream

make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=16)
FRACTION = 0.05
IDENTITY = {"method": "er", "model": "mlp", "width": 16}


def _ids(held: bool, prefix: str) -> Iterator[str]:
    """Record ids the probe holds out (``held``) or never does: a producer may pick its ids."""
    probe = ProbeSet(fraction=FRACTION)
    return (f"{prefix}{k}" for k in count() if probe.holds_out(f"{prefix}{k}") == held)


def _run(stream: Path, probe: ProbeSet, **options) -> tuple[Summary, RunState, Collected, Metrics]:
    sink, metrics = Collected(), Metrics(CollectorRegistry())
    with RecordedSource(stream) as source:
        options = RunOptions(**options, progress=False)
        summary, state = run_stream(source, make, metrics, options, RunParts(probe, dead_letters=sink))
    return summary, state, sink, metrics


def _checkpointed_run(
    stream: Path, store: CheckpointStore, probe: ProbeSet, options: RunOptions, *, every_records: int
) -> tuple[Summary, RunState]:
    """A run of ``stream`` restored from ``store``'s newest checkpoint (if any), checkpointing as it goes."""
    state, restored = restore(store, make, IDENTITY, probe)
    checkpointer = Checkpointer(store, identity=IDENTITY, every_records=every_records, restored=restored, probe=probe)
    with RecordedSource(stream, start_offsets=restored.offsets if restored else None) as source:
        parts = RunParts(probe, checkpointer=checkpointer)
        return run_stream(source, make, Metrics(CollectorRegistry()), options, parts, state=state)


def test_held_out_classes_count_toward_max_classes_also_after_a_restart(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    learned, held = _ids(False, "ok"), _ids(True, "evil")
    rows = [(next(learned), rng.normal(size=8).astype(np.float32), ["legit"])]
    # a hostile producer: every record is held out (its id chosen so) and brings a new class
    rows += [(next(held), rng.normal(size=8).astype(np.float32), [f"class-{i}"]) for i in range(300)]
    rows += [(next(learned), rng.normal(size=8).astype(np.float32), ["late"])]  # a new class past the limit
    stream = _stream(tmp_path / "s.rec.gz", rows)
    store = CheckpointStore(tmp_path / "ckpt")

    def run(max_records: int | None) -> tuple[Summary, RunState, ProbeSet]:
        probe = ProbeSet(fraction=FRACTION)
        options = RunOptions(batch_size=10, max_records=max_records, max_classes=20, progress=False)
        return (*_checkpointed_run(stream, store, probe, options, every_records=50), probe)

    first, _, _ = run(100)
    second, state, probe = run(None)
    assert len(probe.classes) == 19 and state.learner.labels.sizes == [1]  # 1 + 19 = max_classes
    assert first.held_out + second.held_out == 19
    assert first.dead_letter["too_many_classes"] + second.dead_letter["too_many_classes"] == 282
    assert len(probe.state_dict()["paths"]) == 19  # what every checkpoint copies stays bounded too


def test_a_class_held_out_then_learned_counts_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    learned, held = _ids(False, "ok"), _ids(True, "h")
    rows = [(next(learned), rng.normal(size=8).astype(np.float32), ["a"])]
    rows += [(next(held), rng.normal(size=8).astype(np.float32), ["b"])]  # b: the probe's only, for now
    rows += [(next(learned), rng.normal(size=8).astype(np.float32), [name]) for name in ("b", "c", "d")]
    summary, state, sink, _ = _run(
        _stream(tmp_path / "s.rec.gz", rows), ProbeSet(fraction=FRACTION), batch_size=1, max_classes=3
    )
    assert state.learner.labels.names == [["a", "b", "c"]]
    assert [d.message.position.offset for d in sink.dead] == [4] and summary.dead_letter == {"too_many_classes": 1}


def test_a_held_out_path_the_tree_later_contradicts_is_not_scored_as_the_learned_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    learned, held = _ids(False, "ok"), _ids(True, "h")
    rows = [(next(learned), rng.normal(size=8).astype(np.float32), ["animal", "cat"]) for _ in range(5)]
    # held out before the tree knows "bat": nothing contradicts it yet
    rows += [(next(held), (rng.normal(size=8) + 5).astype(np.float32), ["sport", "bat"]) for _ in range(5)]
    for i in range(200):
        ids = held if i % 10 == 0 else learned
        rows.append((next(ids), (rng.normal(size=8) - 5).astype(np.float32), ["animal", "bat"]))
    probe = ProbeSet(fraction=FRACTION, min_samples=5)
    summary, state, sink, metrics = _run(_stream(tmp_path / "s.rec.gz", rows), probe, batch_size=10, probe_every=50)
    assert not sink.dead and summary.held_out == 25
    result = evaluate(probe, state.learner)
    assert set(result.class_accuracy) == {("animal", "bat")}
    assert not any(path[0] == "sport" for path in probe.state_dict()["paths"])  # dropped: never scorable
    bat = metrics.registry.get_sample_value("streamcl_class_accuracy", {"level": "1", "class": "bat"})
    assert bat == result.class_accuracy[("animal", "bat")]


def test_a_held_out_record_never_blocks_the_learned_records_of_its_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    learned, held = _ids(False, "ok"), _ids(True, "h")
    rows = [(next(learned), rng.normal(size=8).astype(np.float32), ["animal", "cat"])]
    rows += [(next(held), rng.normal(size=8).astype(np.float32), ["sport", "bat"])]  # first in the batch
    rows += [(next(learned), rng.normal(size=8).astype(np.float32), ["animal", "bat"]) for _ in range(9)]
    rows += [(next(held), rng.normal(size=8).astype(np.float32), ["sport", "bat"])]  # the tree knows bat now
    probe = ProbeSet(fraction=FRACTION)
    summary, state, sink, _ = _run(_stream(tmp_path / "s.rec.gz", rows), probe, batch_size=10)
    assert {d.message.position.offset: d.reason for d in sink.dead} == {1: "label_conflict", 11: "label_conflict"}
    assert summary.learned == 10 and summary.held_out == 0 and len(probe) == 0
    tree = state.learner.labels
    assert tree.path(*tree.lookup(("animal", "bat"))) == ("animal", "bat")


def test_held_out_inputs_the_learner_would_refuse_are_dead_letters_not_probe_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    learned, held = _ids(False, "ok"), _ids(True, "h")
    rows = [(next(learned), rng.normal(size=8).astype(np.float32), ["a"]) for _ in range(5)]
    # finite float32 (the decoder refuses NaN and infinities), but the step guard's norms overflow
    bad = [np.full(8, 3e38, np.float32), np.full(8, -1e20, np.float32), np.eye(8, dtype=np.float32)[0] * 2e19]
    rows += [(next(held), x, ["a"]) for x in [*bad, rng.normal(size=8).astype(np.float32)]]
    probe = ProbeSet(fraction=FRACTION)
    summary, _, sink, _ = _run(_stream(tmp_path / "s.rec.gz", rows), probe, batch_size=4)
    assert {d.message.position.offset: d.reason for d in sink.dead} == {
        5: "non_finite_loss",
        6: "non_finite_loss",
        7: "non_finite_loss",
    }
    assert summary.held_out == 1 and len(probe) == 1 and summary.learned == 5


def test_a_restored_probe_set_counts_only_the_classes_the_tree_lacks_also_when_nothing_more_is_held_out(
    tmp_path: Path,
) -> None:
    """A restart with --probe-fraction 0 holds nothing out, but the checkpoint's probe set comes back: its classes,
    all learned, must not count toward --max-classes a second time."""
    rng = np.random.default_rng(1)
    learned, held = _ids(False, "ok"), _ids(True, "held")
    rows = []
    for c in range(8):  # 8 classes, each learned and held out
        rows += [(next(learned), rng.normal(size=8).astype(np.float32), [f"c{c}"]) for _ in range(3)]
        rows.append((next(held), rng.normal(size=8).astype(np.float32), [f"c{c}"]))
    rows += [(next(learned), rng.normal(size=8).astype(np.float32), [f"new{c}"]) for c in range(2)]
    stream = _stream(tmp_path / "s.rec.gz", rows)
    store = CheckpointStore(tmp_path / "ckpt")

    def run(fraction: float, max_records: int | None) -> Summary:
        options = RunOptions(batch_size=4, max_records=max_records, max_classes=10, progress=False)
        return _checkpointed_run(stream, store, ProbeSet(fraction=fraction), options, every_records=1)[0]

    first = run(FRACTION, 32)
    assert first.held_out == 8 and first.dead_letter == {}
    second = run(0.0, None)
    assert second.learned == 2 and second.dead_letter == {}  # new0 and new1 fit: 8 + 2 = max_classes
