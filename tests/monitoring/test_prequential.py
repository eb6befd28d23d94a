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


@pytest.mark.parametrize(("saved", "restored"), [(7, 7), (7, 3), (3, 7), (50, 50)])
def test_a_restored_window_goes_on_like_the_saved_one(saved: int, restored: int) -> None:
    """The windows survive a checkpoint (as loaded with ``weights_only``), into a window of another size too:
    it then holds the newest verdicts that fit (of those the smaller saved window held)."""
    import io

    import torch

    rng = np.random.default_rng(1)
    before = PrequentialAccuracy(window=saved)
    history: dict[int, list[bool]] = {0: [], 1: []}
    batches = [(rng.integers(0, 2, n), rng.random(n) < 0.6) for n in rng.integers(1, 15, 40)]
    for level, correct in batches[:25]:
        before.update(level, correct)
        for lvl in (0, 1):
            history[lvl] += correct[level == lvl].tolist()
    saved_bytes = io.BytesIO()
    torch.save(before.state_dict(), saved_bytes)
    after = PrequentialAccuracy(window=restored)
    after.load_state_dict(torch.load(io.BytesIO(saved_bytes.getvalue()), weights_only=True))
    assert after.levels == [0, 1]
    history = {lvl: verdicts[-saved:] for lvl, verdicts in history.items()}
    for level, correct in batches[25:]:
        after.update(level, correct)
        for lvl in (0, 1):
            history[lvl] += correct[level == lvl].tolist()
            recent = history[lvl][-restored:]
            assert after.windowed(lvl) == pytest.approx(sum(recent) / len(recent))
