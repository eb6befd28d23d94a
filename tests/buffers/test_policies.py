"""Slot policies: exact reservoir probabilities, class balance, the eviction hook, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare

from buffers.balanced import ClassBalancedPolicy, LargestClassPolicy
from buffers.memory import MemoryStore
from buffers.open import make_policy
from buffers.reservoir import ReservoirPolicy
from buffers.store import EMPTY, class_keys


def run_policy(policy, keys: np.ndarray, batch: int = 10) -> np.ndarray:
    """Feed ``keys`` in micro-batches; returns the stream position held by every slot (-1: empty)."""
    stored = np.full(policy.capacity, EMPTY, dtype=np.int64)
    position = np.full(policy.capacity, -1, dtype=np.int64)
    for start in range(0, len(keys), batch):
        part = keys[start : start + batch]
        slots = policy.slots(part, stored)
        kept = slots >= 0
        stored[slots[kept]] = part[kept]
        position[slots[kept]] = np.arange(start, start + len(part))[kept]
    return position


@pytest.mark.parametrize("t", [30, 100])
def test_reservoir_keeps_each_of_t_items_with_probability_m_over_t(t):
    capacity, repeats = 10, 3000
    held = np.zeros(t, dtype=np.int64)
    for r in range(repeats):
        held[run_policy(ReservoirPolicy(capacity, seed=r), np.zeros(t, dtype=np.int64), batch=7)] += 1
    assert held.sum() == repeats * capacity
    # every item on its own is kept M/t of the time (Bonferroni over the t items) ...
    worst = min(binomtest(int(k), repeats, capacity / t).pvalue for k in held)
    assert worst > 1e-3 / t, f"an item's retention departs from M/t = {capacity / t:.3f}"
    # ... and no region of the stream is favoured
    assert chisquare(held.reshape(10, -1).sum(axis=1)).pvalue > 1e-3


def imbalanced_stream(seed: int = 0) -> np.ndarray:
    """Class k has sizes[k] samples; classes arrive one after another (class-incremental)."""
    sizes = [600, 300, 40, 8, 200]
    return np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(sizes)])


def held_per_class(policy, keys: np.ndarray) -> np.ndarray:
    position = run_policy(policy, keys)
    return np.bincount(keys[position[position >= 0]], minlength=5)


def test_class_balanced_keeps_small_classes_whole():
    keys = imbalanced_stream()
    counts = held_per_class(ClassBalancedPolicy(100, seed=0), keys)
    assert counts.sum() == 100
    assert counts[3] == 8, "a class smaller than its share keeps every sample"
    large = counts[[0, 1, 2, 4]]
    assert large.max() - large.min() <= 1, f"the other classes are capped equally: {counts}"
    # the plain reservoir loses the small class
    assert held_per_class(ReservoirPolicy(100, seed=0), keys)[3] < 8


def test_class_balanced_shuffled_stream_keeps_small_classes_whole():
    rng = np.random.default_rng(0)
    keys = rng.permutation(np.concatenate([np.zeros(1000), np.ones(20), np.full(5, 2)]).astype(np.int64))
    counts = np.bincount(keys[run_policy(ClassBalancedPolicy(60, seed=1), keys)], minlength=3)
    assert counts.tolist() == [35, 20, 5]


def test_balanced_reservoir_evicts_from_the_largest_class():
    keys = imbalanced_stream()
    policy = LargestClassPolicy(60, admit="reservoir", seed=0)
    stored = np.full(60, EMPTY, dtype=np.int64)
    admitted = 0
    for k in keys.tolist():
        slot = int(policy.slots(np.array([k]), stored)[0])
        counts = np.bincount(stored[stored >= 0], minlength=5)
        counts[k] += 1
        if slot >= 0 and (stored >= 0).all():
            admitted += 1
            assert counts[stored[slot]] == counts.max(), "the victim belongs to a most represented class"
        if slot >= 0:
            stored[slot] = k
    assert 60 < admitted < len(keys) - 60, "admission follows the reservoir rule, not always"


def test_victim_hook_picks_inside_the_largest_class_counting_the_incoming_sample():
    calls = []

    def lowest_slot(candidates: np.ndarray) -> int:
        calls.append(candidates.copy())
        return int(candidates.min())

    policy = LargestClassPolicy(4, admit="always", victim=lowest_slot)
    stored = np.array([5, 5, 7, 7])
    # counting the incoming 7, class 7 is the largest: the hook chooses among its slots 2 and 3
    assert policy.slots(np.array([7]), stored).tolist() == [2]
    assert calls[-1].tolist() == [2, 3]
    # two incoming 5s: the first evicts from class 5 (counted 3), then the slot just written is left out
    assert policy.slots(np.array([5, 5]), stored).tolist() == [0, 1]
    assert [c.tolist() for c in calls[-2:]] == [[0, 1], [1]]


def test_always_admit_writes_every_sample():
    keys = imbalanced_stream()
    policy = LargestClassPolicy(50, admit="always", seed=0)
    stored = np.full(50, EMPTY, dtype=np.int64)
    for start in range(0, len(keys), 10):
        slots = policy.slots(keys[start : start + 10], stored)
        assert (slots >= 0).all()
        stored[slots] = keys[start : start + 10]


@pytest.mark.parametrize("name", ["reservoir", "class-balanced", "balanced-reservoir"])
def test_policy_state_round_trip_continues_identically(name):
    keys = imbalanced_stream()
    a = make_policy(name, 40, seed=2)
    stored = np.full(40, EMPTY, dtype=np.int64)
    for start in range(0, 500, 10):
        slots = a.slots(keys[start : start + 10], stored)
        stored[slots[slots >= 0]] = keys[start : start + 10][slots >= 0]
    b = make_policy(name, 40, seed=99)
    b.load_state_dict(a.state_dict())
    for start in range(500, len(keys), 10):
        part = keys[start : start + 10]
        slots = a.slots(part, stored)
        assert np.array_equal(slots, b.slots(part, stored))
        stored[slots[slots >= 0]] = part[slots >= 0]


def test_memory_store_with_class_policy_counts_classes():
    store = MemoryStore(30, policy=ClassBalancedPolicy(30, seed=0))
    keys = imbalanced_stream()
    for start in range(0, len(keys), 10):
        y = torch.from_numpy(keys[start : start + 10])
        store.add(torch.zeros(len(y), 2), y, torch.zeros(len(y), dtype=torch.long))
    y, _ = store.labels()
    counts = store.stats(classes=True).class_counts
    assert counts == {(0, k): int((y == k).sum()) for k in y.unique().tolist()}
    assert sorted(counts.values()) == [6] * 5, "five classes share 30 slots equally"


def test_class_keys_separate_levels():
    keys = class_keys(np.array([1, 1]), np.array([0, 1]))
    assert keys[0] != keys[1]


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        ReservoirPolicy(0)
    with pytest.raises(ValueError, match="admit"):
        LargestClassPolicy(3, admit="sometimes")
    with pytest.raises(ValueError, match="unknown buffer policy"):
        make_policy("fifo", 3)
    with pytest.raises(ValueError, match="capacity"):
        MemoryStore(5, policy=ReservoirPolicy(4))


def _reservoir_reference(capacity: int, seed: int, batches: list[int]) -> list[list[int]]:
    """Algorithm R for each batch in its masked form (every batch through one code path) and np.unique repeats."""
    rng, seen, out = np.random.default_rng(seed), 0, []
    for n in batches:
        t = np.arange(seen + 1, seen + n + 1, dtype=np.int64)
        seen += n
        slots = t - 1
        full = t > capacity
        if full.any():
            j = rng.integers(0, t[full])
            slots[full] = np.where(j < capacity, j, -1)
        _, first = np.unique(slots[::-1], return_index=True)
        last = np.zeros(n, dtype=bool)
        last[n - 1 - first] = True
        out.append(np.where((slots >= 0) & last, slots, -1).tolist())
    return out


@pytest.mark.parametrize("capacity", [1, 3, 50])
def test_reservoir_slots_equal_the_masked_reference_for_any_batching(capacity):
    """Filling, straddling and full batches (with repeated slots) decide what one masked code path decides."""
    batches = [int(n) for n in np.random.default_rng(capacity).integers(0, 13, 60)]
    policy = ReservoirPolicy(capacity, seed=7)
    got = [policy.slots(np.zeros(n, dtype=np.int64)).tolist() for n in batches]
    assert got == _reservoir_reference(capacity, 7, batches)
    if capacity == 50:  # the case covers full batches that keep several samples (no repeat: no np.unique)
        assert any(len(s) - s.count(-1) > 1 for s in got[len(got) // 2 :])
