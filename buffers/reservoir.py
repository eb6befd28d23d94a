"""Exact reservoir sampling (Vitter's Algorithm R), decided for a whole batch at once."""

from __future__ import annotations

from typing import Any

import numpy as np

from buffers.policy import last_write_wins


class ReservoirPolicy:
    """Decide slots for a batch so that after t items each is kept with probability min(1, M/t).

    Item number t (1-based, counting every item ever offered) goes to slot t-1 while t <= M;
    after that it draws j uniformly from {0, ..., t-1} and replaces slot j if j < M. When two
    items of one batch pick the same slot, the later one wins, exactly as if they had been
    offered one by one. Classes play no part (``stored`` is ignored).

    Parameters
    ----------
    capacity
        Number of slots M (> 0).
    seed
        Seed of the policy's own generator; no global RNG is touched.

    Examples
    --------
    >>> policy = ReservoirPolicy(capacity=3, seed=0)
    >>> policy.slots(np.zeros(4, dtype=np.int64), np.full(3, -1)).tolist()
    [0, 1, 2, -1]
    >>> policy.seen
    4
    """

    def __init__(self, capacity: int, *, seed: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def slots(self, keys: np.ndarray, stored: np.ndarray | None = None) -> np.ndarray:
        """Slot per item for the next ``len(keys)`` items (-1 = not kept); duplicates resolved last-wins."""
        n = len(keys)
        t = np.arange(self.seen + 1, self.seen + n + 1, dtype=np.int64)
        self.seen += n
        slots = t - 1
        if n == 0 or t[-1] <= self.capacity:  # still filling: distinct slots in order, nothing to resolve
            return slots
        if t[0] > self.capacity:  # full: every item draws (the same draws as the masked form below)
            j = self._rng.integers(0, t)
            return last_write_wins(np.where(j < self.capacity, j, -1))
        full = t > self.capacity
        j = self._rng.integers(0, t[full])
        slots[full] = np.where(j < self.capacity, j, -1)
        return last_write_wins(slots)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self._rng.bit_generator.state = state["rng"]
