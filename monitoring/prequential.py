"""Prequential (test-then-train) accuracy per level: cumulative and over a sliding window."""

from __future__ import annotations

from collections import deque

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
        self._recent: dict[int, deque[bool]] = {}

    def update(self, level: np.ndarray, correct: np.ndarray) -> None:
        """Add a batch: ``level[i]`` of each scored sample and whether it was predicted right."""
        self.total += len(correct)
        self.correct += int(correct.sum())
        for lvl in np.unique(level):
            recent = self._recent.setdefault(int(lvl), deque(maxlen=self.window))
            recent.extend(correct[level == lvl].tolist())

    def cumulative(self) -> float:
        """Accuracy over every scored sample so far (0 before any)."""
        return self.correct / self.total if self.total else 0.0

    def windowed(self, level: int) -> float:
        recent = self._recent.get(level)
        return sum(recent) / len(recent) if recent else 0.0

    @property
    def levels(self) -> list[int]:
        return sorted(self._recent)
