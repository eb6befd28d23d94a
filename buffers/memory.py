"""In-process replay store: preallocated tensors on the learner's device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from buffers.reservoir import ReservoirPolicy
from buffers.store import ReplayBatch


class MemoryStore:
    """A fixed-capacity replay buffer held in device tensors, filled by a slot policy.

    Storage is allocated on the first ``add`` (the sample shape is known then) and never
    grows. Insert and sample are a handful of tensor ops per batch, no per-sample loop.

    Parameters
    ----------
    capacity
        Number of samples kept.
    policy
        Decides the slot of each incoming sample; defaults to exact reservoir sampling.
    device
        Where the tensors live.
    seed
        Seed of the sampling generator (independent of the policy's).

    Examples
    --------
    >>> store = MemoryStore(capacity=4)
    >>> store.add(torch.zeros(6, 2), torch.arange(6), torch.zeros(6, dtype=torch.long))
    >>> len(store), len(store.sample(3))
    (4, 3)
    """

    def __init__(
        self,
        capacity: int,
        *,
        policy: ReservoirPolicy | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        self.policy = policy or ReservoirPolicy(capacity, seed=seed)
        if self.policy.capacity != capacity:
            raise ValueError("policy capacity must equal store capacity")
        self.capacity = capacity
        self.device = torch.device(device)
        self._gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        self._x: torch.Tensor | None = None
        self._y = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        self._level = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._size = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        if len(x) == 0:
            return
        if self._x is None:
            self._x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype, device=self.device)
        slots = self.policy.slots(len(x))
        keep = np.flatnonzero(slots >= 0)
        if keep.size == 0:
            return
        src = torch.from_numpy(keep).to(x.device)
        dst = torch.from_numpy(slots[keep]).to(self.device)
        self._x[dst] = x[src].to(self.device, non_blocking=True)
        self._y[dst] = y[src].to(self.device)
        self._level[dst] = level[src].to(self.device)
        self._size = min(self.capacity, self.policy.seen)

    def sample(self, n: int) -> ReplayBatch:
        """Up to ``n`` distinct stored samples, uniformly without replacement."""
        n = min(n, self._size)
        idx = torch.randperm(self._size, generator=self._gen)[:n].to(self.device)
        if self._x is None:
            return ReplayBatch(torch.empty(0), self._y[:0], self._level[:0], idx)
        return ReplayBatch(self._x[idx], self._y[idx], self._level[idx], idx)

    def labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, level) of every stored sample, for composition metrics."""
        return self._y[: self._size], self._level[: self._size]

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        stored = 0 if self._x is None else self._x.element_size() * self._x[0].numel()
        return self._size * (stored + 16)

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": None if self._x is None else self._x.cpu(),
            "y": self._y.cpu(),
            "level": self._level.cpu(),
            "size": self._size,
            "policy": self.policy.state_dict(),
            "gen": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._x = None if state["x"] is None else state["x"].to(self.device)
        self._y = state["y"].to(self.device)
        self._level = state["level"].to(self.device)
        self._size = int(state["size"])
        self.policy.load_state_dict(state["policy"])
        self._gen.set_state(state["gen"])
