"""The ReplayStore contract, run against the memory and the Redis backend (``make_store`` fixture)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from buffers.store import BufferStats

SHAPE = (3, 4, 4)


def batch(start: int, n: int, *, n_classes: int = 3, level: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples start..start+n-1; each image holds its stream position (mod 256) and its class."""
    pos = torch.arange(start, start + n)
    y = pos % n_classes
    x = torch.zeros((n, *SHAPE), dtype=torch.uint8)
    x[:, 0] = (pos % 256).to(torch.uint8).view(-1, 1, 1)
    x[:, 1] = y.to(torch.uint8).view(-1, 1, 1)
    return x, y, torch.full((n,), level, dtype=torch.long)


def feed(store, total: int, size: int = 10, **kwargs) -> list[np.ndarray]:
    return [store.add(*batch(s, min(size, total - s), **kwargs)) for s in range(0, total, size)]


def test_empty_store_samples_nothing(make_store):
    store = make_store(5)
    replay = store.sample(4)
    assert len(store) == 0 and len(replay) == 0
    assert replay.y.dtype == replay.level.dtype == replay.slot.dtype == torch.long
    assert store.stats(classes=True) == BufferStats(size=0, capacity=5, nbytes=0, errors=0, class_counts={})


def test_samples_keep_dtype_shape_and_labels(make_store):
    store = make_store(8)
    feed(store, 30, n_classes=3)
    replay = store.sample(8)
    assert replay.x.dtype == torch.uint8 and replay.x.shape == (8, *SHAPE)
    assert torch.equal(replay.x[:, 1, 0, 0].long(), replay.y), "each sample comes back with its own label"
    assert (replay.level == 0).all()
    assert len(set(replay.slot.tolist())) == 8 and replay.slot.max() < 8


def test_size_is_min_of_capacity_and_seen(make_store):
    store = make_store(25)
    for seen in range(10, 60, 10):
        store.add(*batch(seen - 10, 10))
        assert len(store) == min(25, seen)


def test_add_returns_the_slot_of_each_sample(make_store):
    store = make_store(6)
    x, y, level = batch(0, 15)
    slots = store.add(x, y, level)
    assert slots.shape == (15,) and set(slots.tolist()) <= {-1, 0, 1, 2, 3, 4, 5}
    kept = {int(s): int(p) for p, s in enumerate(slots) if s >= 0}
    assert len(kept) == int((slots >= 0).sum()), "no slot is written twice in one batch"
    replay = store.sample(6)
    stored = dict(zip(replay.slot.tolist(), replay.x[:, 0, 0, 0].tolist(), strict=True))
    assert all(stored[slot] == pos for slot, pos in kept.items())


def test_sample_is_capped_and_distinct(make_store):
    store = make_store(10)
    feed(store, 7)
    replay = store.sample(50)
    assert len(replay) == 7 and sorted(replay.slot.tolist()) == list(range(7))


def test_sample_then_add_draws_before_inserting(make_store):
    store = make_store(10)
    assert len(store.sample_then_add(5, *batch(0, 4))) == 0
    assert len(store) == 4
    replay = store.sample_then_add(10, *batch(100, 6, level=1))
    assert len(replay) == 4 and (replay.level == 0).all(), "the batch being inserted is not in its own replay"
    assert len(store) == 10


def test_class_counts_match_the_stored_labels(make_store):
    store = make_store(20)
    feed(store, 35, n_classes=3)
    feed(store, 12, n_classes=2, level=1)
    replay = store.sample(20)
    expected: dict[tuple[int, int], int] = {}
    for lvl, c in zip(replay.level.tolist(), replay.y.tolist(), strict=True):
        expected[(lvl, c)] = expected.get((lvl, c), 0) + 1
    stats = store.stats(classes=True)
    assert stats.class_counts == expected
    assert sum(stats.class_counts.values()) == stats.size == len(store) == 20
    assert store.stats().class_counts == {}, "classes are counted only when asked"


def test_stats_cover_the_stored_samples(make_store):
    store = make_store(10)
    feed(store, 4)
    stats = store.stats()
    assert (stats.size, stats.capacity, stats.errors) == (4, 10, 0)
    assert 4 * int(np.prod(SHAPE)) <= stats.nbytes < 10 * int(np.prod(SHAPE))
    feed(store, 20)
    assert store.stats().nbytes >= 10 * int(np.prod(SHAPE))
    store.sample(10)
    assert store.stats().corrupt == 0, "nothing damaged: no sample left out"


def test_same_seed_same_decisions(make_store):
    a, b = make_store(7, seed=3), make_store(7, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(feed(a, 80), feed(b, 80), strict=True))
    assert torch.equal(a.sample(5).slot, b.sample(5).slot)


def test_state_dict_loads_weights_only_and_resumes(make_store):
    store = make_store(7, seed=1)
    feed(store, 40)
    buffer = io.BytesIO()
    torch.save(store.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = store.sample(5)
    store.load_state_dict(state)
    again = store.sample(5)
    assert torch.equal(again.slot, expected.slot) and torch.equal(again.x, expected.x)


def test_retention_is_uniform_over_stream_positions(make_store):
    """Chi-square over 20 position bins of which samples a capacity-20 buffer holds after 200."""
    capacity, total, repeats = 20, 200, 100
    held = np.zeros(total, dtype=np.int64)
    for r in range(repeats):
        store = make_store(capacity, seed=r)
        feed(store, total, size=10)
        held[store.sample(capacity).x[:, 0, 0, 0].long().numpy()] += 1
    assert held.sum() == repeats * capacity
    p = chisquare(held.reshape(20, -1).sum(axis=1)).pvalue
    assert p > 1e-3, f"retention is not uniform over stream positions (p = {p:.2g})"


def test_another_sample_shape_is_refused(make_store):
    store = make_store(5)
    store.add(*batch(0, 3))
    with pytest.raises(ValueError, match="buffer holds"):
        store.add(torch.zeros(2, 5, dtype=torch.uint8), *batch(0, 2)[1:])


def test_class_balanced_keeps_small_classes_whole(make_store):
    """Class-incremental stream with classes of 600, 300, 40, 8 and 200 samples into 100 slots."""
    store = make_store(100, policy="class-balanced")
    start = 0
    for k, n in enumerate([600, 300, 40, 8, 200]):
        for s in range(0, n, 10):
            x, _, level = batch(start + s, min(10, n - s))
            store.add(x, torch.full((len(x),), k), level)
        start += n
    counts = {y: c for (_, y), c in store.stats(classes=True).class_counts.items()}
    assert counts[3] == 8, f"the small class keeps every sample: {counts}"
    large = [counts[k] for k in (0, 1, 2, 4)]
    assert sum(large) == 92 and max(large) - min(large) <= 1, f"the others share the rest equally: {counts}"
    replay = store.sample(100)
    assert (replay.y == 3).sum() == 8


def test_class_balanced_same_seed_same_decisions(make_store):
    a, b = make_store(9, seed=4, policy="class-balanced"), make_store(9, seed=4, policy="class-balanced")
    assert all(np.array_equal(p, q) for p, q in zip(feed(a, 90), feed(b, 90), strict=True))
