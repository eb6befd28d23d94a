"""In-process replay store: preallocated tensors on the learner's device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from buffers.policy import SlotPolicy
from buffers.reservoir import ReservoirPolicy
from buffers.store import EMPTY, BufferStats, ReplayBatch, class_keys, split_key


class MemoryStore:
    """A fixed-capacity replay buffer held in device tensors, filled by a slot policy.

    Storage is allocated on the first ``add`` (the sample shape is known then) and never
    grows. Insert and sample are a handful of tensor ops per batch, no per-sample loop. A CPU
    copy of each slot's class key (``level * 2**32 + y``) serves class-aware policies and
    :meth:`stats` (classes counted when asked, at probe time, not per insert) without a device sync.

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
    >>> store.add(torch.zeros(6, 2), torch.arange(6), torch.zeros(6, dtype=torch.long)).tolist()
    [0, 1, 2, -1, -1, 3]
    >>> len(store), len(store.sample(3))
    (4, 3)
    """

    def __init__(
        self,
        capacity: int,
        *,
        policy: SlotPolicy | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        self.policy = policy or ReservoirPolicy(capacity, seed=seed)
        if self.policy.capacity != capacity:
            raise ValueError("policy capacity must equal store capacity")
        self.capacity = capacity
        self.device = torch.device(device)
        self._rng = np.random.default_rng(seed + 1)
        self._x: torch.Tensor | None = None
        self._y = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        self._level = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._keys = np.full(capacity, EMPTY, dtype=np.int64)
        self._size = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> np.ndarray:
        """Insert a micro-batch; returns the slot of each sample (-1: not kept)."""
        if len(x) == 0:
            return np.empty(0, dtype=np.int64)
        if self._x is None:
            self._x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype, device=self.device)
        if x.shape[1:] != self._x.shape[1:] or x.dtype != self._x.dtype:
            raise ValueError(f"buffer holds {self._x.dtype}{list(self._x.shape[1:])}, got {x.dtype}{list(x.shape[1:])}")
        keys = class_keys(y.cpu().numpy(), level.cpu().numpy())
        slots = self.policy.slots(keys, self._keys)
        keep = np.flatnonzero(slots >= 0)
        if keep.size == 0:
            return slots
        written = slots[keep]
        self._keys[written] = keys[keep]
        dst = _on(torch.from_numpy(written), self.device)
        if keep.size < len(slots):
            src = _on(torch.from_numpy(keep), x.device)
            x, y, level = x.index_select(0, src), y.index_select(0, src), level.index_select(0, src)
        # index_copy_ with distinct slots (the policy resolved repeats) writes what indexed assignment would, cheaper
        self._x.index_copy_(0, dst, _on(x, self.device, non_blocking=True))
        self._y.index_copy_(0, dst, _on(y, self.device))
        self._level.index_copy_(0, dst, _on(level, self.device))
        if self._size < self.capacity:  # policies fill slots 0, 1, ... in order
            self._size = max(self._size, int(written.max()) + 1)
        return slots

    def sample(self, n: int) -> ReplayBatch:
        """Up to ``n`` distinct stored samples, uniformly without replacement."""
        n = min(n, self._size)
        if self._x is None or n == 0:
            return ReplayBatch.empty(self.device)
        # numpy draws n distinct slots in O(n) (torch.randperm would shuffle all of them)
        idx = _on(torch.from_numpy(self._rng.choice(self._size, n, replace=False)), self.device)
        return ReplayBatch(
            self._x.index_select(0, idx), self._y.index_select(0, idx), self._level.index_select(0, idx), idx
        )

    def sample_then_add(self, n: int, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> ReplayBatch:
        """``sample(n)`` from the buffer as it is, then ``add`` the batch (the sample is a copy)."""
        replay = self.sample(n)
        self.add(x, y, level)
        return replay

    def labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, level) of every stored sample, for composition metrics."""
        return self._y[: self._size], self._level[: self._size]

    def __len__(self) -> int:
        return self._size

    def stats(self, *, classes: bool = False) -> BufferStats:
        """Size, payload bytes (of the stored samples, not the preallocated ``capacity``), no errors;
        with ``classes``, the stored samples per class ``(level, y)`` (one ``np.unique`` over the slots)."""
        item = 0 if self._x is None else self._x.element_size() * self._x[0].numel()
        counts = {}
        if classes:
            keys, n = np.unique(self._keys[: self._size], return_counts=True)
            counts = {split_key(k): c for k, c in zip(keys.tolist(), n.tolist(), strict=True)}
        return BufferStats(self._size, self.capacity, self._size * (item + 16), 0, counts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": None if self._x is None else self._x.cpu(),
            "y": self._y.cpu(),
            "level": self._level.cpu(),
            "keys": torch.from_numpy(self._keys.copy()),
            "size": self._size,
            "policy": self.policy.state_dict(),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._x = None if state["x"] is None else state["x"].to(self.device)
        self._y = state["y"].to(self.device)
        self._level = state["level"].to(self.device)
        self._keys = state["keys"].numpy().copy()
        self._size = int(state["size"])
        self.policy.load_state_dict(state["policy"])
        self._rng.bit_generator.state = state["rng"]


def _on(t: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """``t`` on ``device``; no ``.to`` dispatch when it is there already (a small batch pays per op)."""
    return t if t.device == device else t.to(device, non_blocking=non_blocking)
