"""Prequential (test-then-train) accuracy per level: cumulative and over a sliding window."""

from __future__ import annotations

from typing import Any

import numpy as np


class PrequentialAccuracy:
    """Accuracy of predictions made before learning, per level.

    ``update`` takes one batch (vectorised); ``window`` bounds the sliding estimate by samples.

    Examples
    --------
    >>> acc = PrequentialAccuracy(window=4)
    >>> acc.update(np.array([0, 0, 1]), np.array([True, False, True]))
    >>> acc.cumulative(), acc.windowed(0)
    (0.6666666666666666, 0.5)
    """

    def __init__(self, window: int = 1000) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = window
        self.total = 0
        self.correct = 0
        self._recent: dict[int, _Window] = {}

    def update(self, level: np.ndarray, correct: np.ndarray) -> None:
        """Add a batch: ``level[i]`` of each scored sample and whether it was predicted right."""
        self.total += len(correct)
        self.correct += int(np.count_nonzero(correct))
        if not len(level):
            return
        if (level == level[0]).all():  # the common case, one level per batch: no grouping needed
            self._level(int(level[0])).extend(correct)
            return
        for lvl in np.unique(level):
            self._level(int(lvl)).extend(correct[level == lvl])

    def _level(self, level: int) -> _Window:
        recent = self._recent.get(level)
        if recent is None:
            recent = self._recent[level] = _Window(self.window)
        return recent

    def cumulative(self) -> float:
        """Accuracy over every scored sample so far (0 before any)."""
        return self.correct / self.total if self.total else 0.0

    def windowed(self, level: int) -> float:
        """Accuracy over the last ``window`` scored samples of ``level`` (0 before any)."""
        recent = self._recent.get(level)
        return recent.hits / recent.size if recent and recent.size else 0.0

    @property
    def levels(self) -> list[int]:
        return sorted(self._recent)

    def state_dict(self) -> dict[str, Any]:
        """Each level's windowed verdicts, oldest first, as tensors (a checkpoint holding them loads with
        ``torch.load(weights_only=True)``), so a restart goes on with the windows it stopped with. The
        cumulative counts are not in it: they describe one run."""
        import torch  # here: the accuracy itself is numpy; only its checkpoint state is tensors

        return {"levels": [[level, torch.from_numpy(self._recent[level].ordered())] for level in self.levels]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Windows from :meth:`state_dict`, of this or any other window size (the newest verdicts are kept)."""
        windows = {}
        for level, verdicts in state["levels"]:
            windows[int(level)] = window = _Window(self.window)
            window.extend(np.asarray(verdicts, dtype=bool))
        self._recent = windows


class _Window:
    """The last ``capacity`` verdicts in a ring, with their running hit count (O(batch) per update)."""

    def __init__(self, capacity: int) -> None:
        self.ring = np.zeros(capacity, dtype=bool)
        self.size = self.head = self.hits = 0

    def extend(self, values: np.ndarray) -> None:
        values = values[-len(self.ring) :]
        end = self.head + len(values)
        # the verdicts overwritten (unfilled slots hold False): a slice unless the batch wraps around
        idx = slice(self.head, end) if end <= len(self.ring) else np.arange(self.head, end) % len(self.ring)
        self.hits -= int(np.count_nonzero(self.ring[idx]))
        self.ring[idx] = values
        self.hits += int(np.count_nonzero(values))
        self.head = end % len(self.ring)
        self.size = min(len(self.ring), self.size + len(values))

    def ordered(self) -> np.ndarray:
        """The verdicts held, oldest first."""
        if self.size < len(self.ring):
            return self.ring[: self.size].copy()
        return np.roll(self.ring, -self.head)
