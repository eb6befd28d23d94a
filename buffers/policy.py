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
    if kept.sum() <= 1:
        return slots
    reversed_slots = slots[::-1]
    _, first_in_reversed = np.unique(reversed_slots, return_index=True)
    last = np.zeros(len(slots), dtype=bool)
    last[len(slots) - 1 - first_in_reversed] = True
    return np.where(kept & last, slots, -1)


def fill_free(slots: np.ndarray, stored: np.ndarray) -> int:
    """Give the batch's first samples the free slots, in order; returns how many were placed."""
    filled = int(np.count_nonzero(stored != EMPTY))
    n = min(len(slots), len(stored) - filled)
    slots[:n] = np.arange(filled, filled + n)
    return n


def class_table(keys: np.ndarray, stored: np.ndarray) -> tuple[dict[int, int], np.ndarray]:
    """Index of every class present in the batch or the buffer, and the stored count of each."""
    classes, counts = np.unique(stored[stored != EMPTY], return_counts=True)
    extra = np.setdiff1d(np.unique(keys), classes)
    classes = np.concatenate([classes, extra])
    counts = np.concatenate([counts, np.zeros(len(extra), dtype=counts.dtype)]).astype(np.int64)
    return {int(k): i for i, k in enumerate(classes)}, counts
