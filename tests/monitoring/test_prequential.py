"""The sliding-window prequential accuracy matches a direct count over the last `window` verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.prequential import PrequentialAccuracy


@pytest.mark.parametrize("window", [1, 7, 50])
def test_window_matches_a_direct_count(window: int) -> None:
    rng = np.random.default_rng(0)
    acc = PrequentialAccuracy(window=window)
    history: dict[int, list[bool]] = {0: [], 1: []}
    for _ in range(200):
        n = int(rng.integers(1, 15))
        level, correct = rng.integers(0, 2, n), rng.random(n) < 0.6
        acc.update(level, correct)
        for lvl in (0, 1):
            history[lvl] += correct[level == lvl].tolist()
            recent = history[lvl][-window:]
            expected = sum(recent) / len(recent) if recent else 0.0
            assert acc.windowed(lvl) == pytest.approx(expected)
    assert acc.cumulative() == pytest.approx(np.mean(history[0] + history[1]))


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        PrequentialAccuracy(window=0)
