"""SyntheticSource: deterministic, labelled, resumable, bounded."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.source import next_offsets
from consumers.synthetic import SyntheticSource


def _all(source: SyntheticSource, batch: int) -> list:
    records = []
    while not source.exhausted:
        records += source.poll(0.0, batch).records
    return records


def test_records_are_labelled_in_turn_with_their_index_as_offset() -> None:
    records = _all(SyntheticSource(7, dim=3, n_classes=3, stream="s"), 4)
    assert [r.label for r in records] == [(f"c{i % 3}",) for i in range(7)]
    assert [(r.id, r.position.stream, r.position.partition, r.position.offset) for r in records] == [
        (f"s-{i}", "s", 0, i) for i in range(7)
    ]
    assert all(r.x.dtype == np.float32 and r.x.shape == (3,) and np.isfinite(r.x).all() for r in records)


def test_classes_are_separable_by_their_means() -> None:
    records = _all(SyntheticSource(600, dim=8, n_classes=3, seed=1), 100)
    x = np.stack([r.x for r in records])
    y = np.array([int(r.label[0][1:]) for r in records])
    means = np.stack([x[y == k].mean(axis=0) for k in range(3)])
    nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() > 0.8  # class means are 2-sigma apart per dimension, noise is 1


def test_same_seed_same_stream_whatever_the_batch_sizes() -> None:
    a = _all(SyntheticSource(50, dim=4, seed=3), 7)
    b = _all(SyntheticSource(50, dim=4, seed=3), 50)
    c = _all(SyntheticSource(50, dim=4, seed=4), 50)
    assert all(np.array_equal(p.x, q.x) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[0].x, c[0].x)


def test_resuming_from_a_commit_continues_the_same_stream() -> None:
    whole = _all(SyntheticSource(40, dim=4, seed=2), 40)
    first = SyntheticSource(40, dim=4, seed=2)
    head = first.poll(0.0, 15).records
    first.commit(next_offsets(r.position for r in head))
    resumed = _all(SyntheticSource(40, dim=4, seed=2, start_offsets=first.committed), 6)
    assert [r.id for r in resumed] == [r.id for r in whole[15:]]
    assert all(np.array_equal(p.x, q.x) for p, q in zip(resumed, whole[15:], strict=True))
    assert SyntheticSource(40, start_offsets={("synthetic", 0): 40}).exhausted


def test_empty_and_invalid_sources() -> None:
    empty = SyntheticSource(0)
    assert empty.exhausted and not len(empty.poll(0.0, 5))
    for kwargs in ({"n_records": -1}, {"n_records": 1, "dim": 0}, {"n_records": 1, "n_classes": 0}):
        with pytest.raises(ValueError):
            SyntheticSource(**kwargs)
