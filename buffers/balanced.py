"""Class-aware policies: class-balancing reservoir (CBRS) and largest-class eviction with a victim hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from buffers.policy import StoredCounts, fill_free, last_write_wins

Victim = Callable[[np.ndarray], int]
"""Picks the slot to evict among candidate slots (all of the victim class)."""


class ClassBalancedPolicy:
    """Class-balancing reservoir sampling, CBRS (Chrysakis & Moens, ICML 2020).

    While the buffer has free slots every sample is stored. Then, for a sample of class c
    (``n_c`` = stream samples of c so far, this one included; ``m_c`` = stored samples of c):
    the classes with the most stored samples are marked *full* (for good); if c is not full, a
    random stored sample of a random largest class is replaced; if c is full, with probability
    ``m_c / n_c`` a random stored sample of c is replaced (a per-class reservoir), else the
    sample is dropped. Small classes keep all their samples; large ones are capped equally.

    The decisions within a batch depend on each other, so they are taken one sample at a time,
    over the few samples of the micro-batch that arrive when the buffer is full.

    Parameters
    ----------
    capacity
        Number of slots M (> 0).
    seed
        Seed of the policy's own generator.

    Examples
    --------
    >>> policy = ClassBalancedPolicy(capacity=4, seed=0)
    >>> stored = np.full(4, -1)
    >>> slots = policy.slots(np.array([0, 0, 0, 0]), stored); stored[slots] = 0
    >>> policy.slots(np.array([1, 1]), stored).tolist()  # class 1 is small: it takes class 0's slots
    [3, 1]
    """

    def __init__(self, capacity: int, *, seed: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._stream: dict[int, int] = {}
        self._full: set[int] = set()
        self._stored = StoredCounts()

    def slots(self, keys: np.ndarray, stored: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        slots = np.full(len(keys), -1, dtype=np.int64)
        placed = fill_free(slots, self._stored.filled(stored), self.capacity)
        for k in keys[:placed].tolist():
            self._stream[k] = self._stream.get(k, 0) + 1
        if placed < len(keys):
            local = stored.copy()
            local[slots[:placed]] = keys[:placed]
            index, counts = self._stored.table(keys, stored)
            np.add.at(counts, [index[k] for k in keys[:placed].tolist()], 1)
            for i in range(placed, len(keys)):
                slots[i] = self._one(int(keys[i]), local, index, counts)
        self.seen += len(keys)
        slots = last_write_wins(slots)
        self._stored.commit(keys, stored, slots)
        return slots

    def _one(self, c: int, local: np.ndarray, index: dict[int, int], counts: np.ndarray) -> int:
        self._stream[c] = self._stream.get(c, 0) + 1
        largest = np.flatnonzero(counts == counts.max())
        classes = list(index)
        self._full.update(classes[j] for j in largest)
        if c not in self._full:
            victim_class = classes[largest[self._rng.integers(len(largest))]]
        elif self._rng.random() < counts[index[c]] / self._stream[c]:
            victim_class = c
        else:
            return -1
        candidates = np.flatnonzero(local == victim_class)
        slot = int(candidates[self._rng.integers(len(candidates))])
        counts[index[victim_class]] -= 1
        counts[index[c]] += 1
        local[slot] = c
        return slot

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "rng": self._rng.bit_generator.state,
            "stream": [list(self._stream), list(self._stream.values())],
            "full": sorted(self._full),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self._rng.bit_generator.state = state["rng"]
        self._stream = dict(zip(*state["stream"], strict=True))
        self._full = set(state["full"])
        self._stored = StoredCounts()


class LargestClassPolicy:
    """Evict from the most represented class; which sample goes is a hook.

    While the buffer has free slots every sample is stored. Then a sample is *admitted* --
    always (``admit="always"``: memory written on arrival) or by the reservoir rule, with
    probability M/t for the t-th sample (``admit="reservoir"``) -- and replaces a sample of the
    victim class: the class with the most stored samples, counting the incoming one (ties broken
    at random). Inside the victim class, ``victim(candidates)`` picks the slot, where
    ``candidates`` are the victim class's slots (those written earlier in the same batch left
    out while others remain); by default a uniformly random one.

    * ``admit="reservoir"``, no hook: balanced reservoir sampling (Buzzega et al., ICPR 2020).
    * ``admit="always"``, ``victim`` = lowest importance: CLIB / PL-FMS memory management. Keep a
      per-slot score array next to the store and pass
      ``victim=lambda c: int(c[np.argmin(scores[c])])``; ``store.add`` returns the slot of each
      sample (-1 = dropped), where the new samples' initial scores are written.

    Parameters
    ----------
    capacity
        Number of slots M (> 0).
    admit
        ``"always"`` or ``"reservoir"``.
    victim
        Slot picker within the victim class; uniform at random when None.
    seed
        Seed of the policy's own generator.

    Examples
    --------
    >>> policy = LargestClassPolicy(capacity=3, admit="always", victim=lambda c: int(c.max()))
    >>> stored = np.array([7, 7, 5])
    >>> policy.slots(np.array([5]), stored).tolist()  # class 7 is largest; the hook picks slot 1
    [1]
    """

    def __init__(self, capacity: int, *, admit: str = "reservoir", victim: Victim | None = None, seed: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if admit not in ("always", "reservoir"):
            raise ValueError(f"admit must be 'always' or 'reservoir', got {admit!r}")
        self.capacity = capacity
        self.admit = admit
        self.victim = victim
        self.seed = seed
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._stored = StoredCounts()

    def slots(self, keys: np.ndarray, stored: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        slots = np.full(len(keys), -1, dtype=np.int64)
        placed = fill_free(slots, self._stored.filled(stored), self.capacity)
        t = np.arange(self.seen + 1, self.seen + len(keys) + 1)
        self.seen += len(keys)
        admitted = np.ones(len(keys), dtype=bool)
        if self.admit == "reservoir":
            admitted[placed:] = self._rng.integers(0, t[placed:]) < self.capacity
        todo = np.flatnonzero(admitted[placed:]) + placed
        if len(todo):
            local = stored.copy()
            local[slots[:placed]] = keys[:placed]
            index, counts = self._stored.table(keys, stored)
            np.add.at(counts, [index[k] for k in keys[:placed].tolist()], 1)
            written = np.zeros(len(local), dtype=bool)
            for i in todo.tolist():
                slots[i] = self._one(int(keys[i]), local, index, counts, written)
        slots = last_write_wins(slots)
        self._stored.commit(keys, stored, slots)
        return slots

    def _one(self, c: int, local: np.ndarray, index: dict[int, int], counts: np.ndarray, written: np.ndarray) -> int:
        counts[index[c]] += 1
        present = np.where(counts - (np.arange(len(counts)) == index[c]) > 0, counts, -1)
        largest = np.flatnonzero(present == present.max())
        victim_class = list(index)[largest[self._rng.integers(len(largest))]]
        counts[index[victim_class]] -= 1
        candidates = np.flatnonzero(local == victim_class)
        fresh = candidates[~written[candidates]]
        candidates = fresh if len(fresh) else candidates
        slot = int(self.victim(candidates)) if self.victim else int(candidates[self._rng.integers(len(candidates))])
        local[slot] = c
        written[slot] = True
        return slot

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self._rng.bit_generator.state = state["rng"]
        self._stored = StoredCounts()
