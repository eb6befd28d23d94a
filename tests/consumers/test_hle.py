"""HLE stream builders: task composition, levels, disjointness/duplication, seeding, messages."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from consumers.datasets import LabelledArrays
from consumers.hle import build, dual_label, main, multi_depth, single_label
from consumers.record import Record
from consumers.recorded import RecordedSource, read_messages, write_messages
from consumers.wire import decode

N_FINE, N_COARSE, PER_CLASS = 10, 5, 12


def _arrays() -> LabelledArrays:
    y = np.repeat(np.arange(N_FINE), PER_CLASS)
    x = np.arange(len(y), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.uint8)
    fine = tuple(f"f{c}" for c in range(N_FINE))
    coarse = tuple(f"c{c}" for c in range(N_COARSE))
    return LabelledArrays(x, y, fine, y // 2, coarse)


def test_single_label_is_a_parent_task_then_child_tasks_of_whole_superclasses() -> None:
    data = _arrays()
    stream = single_label(data, seed=0, parent_share=0.25, child_tasks=5)
    assert len(stream) == N_FINE * PER_CLASS
    assert np.bincount(stream.task).tolist() == [N_FINE * 3] + [2 * 9] * 5
    assert (stream.level[stream.task == 0] == 0).all() and (stream.level[stream.task > 0] == 1).all()
    parent_rows = stream.rows[stream.task == 0]
    assert Counter(data.y[parent_rows].tolist()) == dict.fromkeys(range(N_FINE), 3)  # every class, 3 each
    assert len(set(stream.rows.tolist())) == len(stream)  # disjoint: each image once
    coarse_of_task = [set(data.y_coarse[stream.rows[stream.task == t]].tolist()) for t in range(1, 6)]
    assert all(len(c) == 1 for c in coarse_of_task) and set().union(*coarse_of_task) == set(range(N_COARSE))
    for row, path in zip(stream.rows[:5], stream.paths[:5], strict=True):
        assert path == data.path(int(row))[:1]
    assert all(p == data.path(int(r)) for r, p, t in zip(stream.rows, stream.paths, stream.task, strict=True) if t)


def test_dual_label_shows_every_image_twice_parent_first_with_distinct_ids() -> None:
    data = _arrays()
    stream = dual_label(data, seed=1, per_class=8)
    assert len(stream) == 2 * N_FINE * 8
    first, later = stream.rows[stream.task == 0], stream.rows[stream.task > 0]
    assert sorted(first.tolist()) == sorted(later.tolist()) and len(set(first.tolist())) == N_FINE * 8
    assert (stream.level[stream.task == 0] == 0).all() and (stream.level[stream.task > 0] == 1).all()
    assert len(set(stream.ids)) == len(stream)


def test_multi_depth_has_one_level_per_task_on_disjoint_images() -> None:
    data = _arrays()
    taxonomy = {f"c{c}": ("even" if c % 2 == 0 else "odd",) for c in range(N_COARSE)}
    stream = multi_depth(data, taxonomy=taxonomy, seed=0)
    assert stream.task.tolist() == stream.level.tolist()
    assert np.bincount(stream.task).tolist() == [N_FINE * 4] * 3
    assert len(set(stream.rows.tolist())) == len(stream)
    deep = stream.paths[-1]
    assert len(deep) == 3 and deep[0] == taxonomy[deep[1]][0]
    with pytest.raises(ValueError, match="taxonomy"):
        multi_depth(data, taxonomy={"c0": ("x",)})


def test_orders_are_seeded() -> None:
    data = _arrays()
    a, b, c = (single_label(data, seed=s) for s in (3, 3, 4))
    assert a.rows.tolist() == b.rows.tolist() and a.ids == b.ids
    assert a.rows.tolist() != c.rows.tolist()
    with pytest.raises(ValueError, match="unknown setup"):
        build("triple", data)
    with pytest.raises(ValueError, match="per_class"):
        single_label(data, per_class=1)


def test_messages_carry_the_label_path_and_replay_from_a_recorded_file(tmp_path) -> None:
    data = _arrays()
    stream = dual_label(data, seed=0, per_class=2)
    path = tmp_path / "hle.rec.gz"
    assert write_messages(path, stream.messages(data, topic="hle")) == len(stream)
    records = [decode(m) for m in read_messages(path)]
    assert all(isinstance(r, Record) for r in records)
    assert [r.label for r in records] == list(stream.paths)
    assert [r.id for r in records] == list(stream.ids)
    assert all(r.x[0, 0, 0] == data.x[int(row)][0, 0, 0] for r, row in zip(records, stream.rows, strict=True))
    with RecordedSource(path) as source:
        assert len(source.poll(0, 1000).records) == len(stream)


def test_cli_writes_a_limited_stream_from_cifar_shaped_files(tmp_path) -> None:
    data = _arrays()
    names = {"fine_label_names": list(data.fine_names), "coarse_label_names": list(data.coarse_names)}
    (tmp_path / "cifar100_label_map.json").write_text(json.dumps(names))
    half = len(data) // 2
    parts = [
        {"x_train": data.x[:half], "y_train": data.y[:half], "y_train_coarse": data.y_coarse[:half]},
        {"x_train": data.x[half:], "y_train": data.y[half:], "y_train_coarse": data.y_coarse[half:]},
    ]
    parts[1] |= {"x_test": data.x[:10], "y_test": data.y[:10], "y_test_coarse": data.y_coarse[:10]}
    for i, part in enumerate(parts, start=1):
        np.savez_compressed(tmp_path / f"cifar100.part{i}.npz", **part)
    out = tmp_path / "s.rec.gz"
    argv = ["--setup", "single", "--data-dir", str(tmp_path), "--out", str(out), "--per-class", "4", "--limit", "7"]
    assert main(argv) == 0
    messages = list(read_messages(out))
    assert len(messages) == 7 and all(len(decode(m).label) == 1 for m in messages)
