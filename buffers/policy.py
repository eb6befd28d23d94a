"""The SlotPolicy protocol: which slot each incoming sample of a micro-batch goes to.

A policy decides for a whole batch at once from its own seeded generator. It sees the class key
of each incoming sample (:func:`buffers.store.class_keys`) and the class key stored in every slot
(``EMPTY`` for free slots), which the store keeps; it returns one slot per sample, -1 for samples
not kept. Slots fill in order (0, 1, ...) until the buffer is full, so the filled slots are always
``0 .. size-1``. When two samples of a batch get the same slot the later one wins, as if the
samples had arrived one by one (:func:`last_write_wins`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from buffers.store import EMPTY


@runtime_checkable
class SlotPolicy(Protocol):
    capacity: int
    seen: int

    def slots(self, keys: np.ndarray, stored: np.ndarray) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def last_write_wins(slots: np.ndarray) -> np.ndarray:
    """Set to -1 every entry whose slot is written again later in the same batch."""
    kept = slots >= 0
    written = slots[kept]
    if len(written) <= 1:
        return slots
    ordered = np.sort(written)
    if (ordered[1:] != ordered[:-1]).all():  # no slot written twice: the common case, without np.unique
        return slots
    reversed_slots = slots[::-1]
    _, first_in_reversed = np.unique(reversed_slots, return_index=True)
    last = np.zeros(len(slots), dtype=bool)
    last[len(slots) - 1 - first_in_reversed] = True
    return np.where(kept & last, slots, -1)


class StoredCounts:
    """Stored samples per class, kept in step with a policy's own decisions.

    The store writes exactly the slots its policy returns, so the policy can follow the class
    counts from its decisions in O(batch) instead of recounting all M slots per batch. The counts
    are rebuilt from the slots when unknown (a new or reloaded policy, or one given a used store).
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] | None = None

    def table(self, keys: np.ndarray, stored: np.ndarray) -> tuple[dict[int, int], np.ndarray]:
        """Index of every class in the batch or the buffer, and the stored count of each."""
        if self.counts is None:
            classes, counts = np.unique(stored[stored != EMPTY], return_counts=True)
            self.counts = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        classes = list(self.counts) + [k for k in np.unique(keys).tolist() if k not in self.counts]
        return {k: i for i, k in enumerate(classes)}, np.array([self.counts.get(k, 0) for k in classes], dtype=np.int64)

    def filled(self, stored: np.ndarray) -> int:
        """Slots in use (slots fill in order, so they are 0 .. filled-1)."""
        return int(np.count_nonzero(stored != EMPTY)) if self.counts is None else sum(self.counts.values())

    def commit(self, keys: np.ndarray, stored: np.ndarray, slots: np.ndarray) -> None:
        """Account for a batch's final slots (after :func:`last_write_wins`), before the store writes them."""
        if self.counts is None:
            return
        kept = slots >= 0
        old = stored[slots[kept]]
        for array, sign in ((old[old != EMPTY], -1), (keys[kept], +1)):
            classes, counts = np.unique(array, return_counts=True)
            for k, c in zip(classes.tolist(), counts.tolist(), strict=True):
                left = self.counts.get(k, 0) + sign * c
                if left:
                    self.counts[k] = left
                else:
                    self.counts.pop(k, None)


def fill_free(slots: np.ndarray, filled: int, capacity: int) -> int:
    """Give the batch's first samples the free slots, in order; returns how many were placed."""
    n = min(len(slots), capacity - filled)
    slots[:n] = np.arange(filled, filled + n)
    return n
