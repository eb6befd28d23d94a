"""Hierarchical scoring (HLE, Lee et al. ICCV 2023): the parent rule, anytime accuracy, final forgetting.

Pure numpy over class indices; the label tree is passed in as *parent maps*: ``parent_maps[l][c]``
is the index (at level ``l - 1``) of the parent of class ``c`` at level ``l`` (-1 at level 0).

The parent rule, as in the HLE single-depth code: a sample labelled at level ``l`` counts as correct
when level ``l``'s head predicts its class **or** the class predicted at level ``l + 1`` has that class
as its parent. Only the immediate child level is consulted (the paper's multi-depth tables score each
level's own head; pass ``parent_rule=False`` for that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def level_correct(
    predicted: np.ndarray,
    level: np.ndarray,
    y: np.ndarray,
    parent_maps: Sequence[np.ndarray] | None = None,
    *,
    parent_rule: bool = True,
) -> np.ndarray:
    """Whether each sample is predicted right at its own level.

    Parameters
    ----------
    predicted
        ``[n, levels]`` predicted class index per level (-1 where a level has no class yet).
    level, y
        Each sample's label level and class index at that level.
    parent_maps
        Parent index of every class, per level (needed for the parent rule; None disables it).
    parent_rule
        Also accept a right prediction of a child whose parent is the true class.

    Examples
    --------
    >>> pred = np.array([[0, 3], [1, 2], [1, 0]])
    >>> maps = [np.array([-1, -1]), np.array([1, 1, 0, 0])]
    >>> level_correct(pred, np.array([0, 0, 0]), np.array([0, 0, 0]), maps).tolist()
    [True, True, False]
    """
    predicted = np.asarray(predicted)
    level = np.asarray(level, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    n, depth = predicted.shape if predicted.ndim == 2 else (len(level), 0)
    if depth == 1:  # a flat stream: no parent rule, no row indexing (this runs every batch)
        return (level == 0) & (predicted[:, 0] == y)
    rows = np.arange(n)
    inside = (level >= 0) & (level < depth)
    own = np.zeros(n, dtype=bool)
    own[inside] = predicted[rows[inside], level[inside]] == y[inside]
    if not parent_rule or parent_maps is None:
        return own
    via_child = np.zeros(n, dtype=bool)
    for lvl in range(min(depth - 1, len(parent_maps) - 1)):
        pmap = np.asarray(parent_maps[lvl + 1], dtype=np.int64)
        rows_l = np.flatnonzero(level == lvl)
        child = predicted[rows_l, lvl + 1]
        ok = (child >= 0) & (child < len(pmap))
        parent = np.full(len(rows_l), -1, dtype=np.int64)
        parent[ok] = pmap[child[ok]]
        via_child[rows_l] = ok & (parent == y[rows_l])
    return own | via_child


def anytime_accuracy(curve: Sequence[float]) -> tuple[float, float]:
    """``(A_auc, A_last)`` of accuracies measured every eval period (normalised AUC, CLIB/HLE).

    >>> anytime_accuracy([0.25, 0.5, 0.75])
    (0.5, 0.75)
    """
    if not len(curve):
        return 0.0, 0.0
    values = np.asarray(curve, dtype=np.float64)
    return float(values.mean()), float(values[-1])


def final_forgetting(history: Mapping[object, Sequence[float]]) -> float:
    """Class-wise F_last: mean over classes of ``max_{t<T} acc_t - acc_T`` where that max is > 0.

    ``history[c]`` is class ``c``'s accuracy at each evaluation it was part of, last one final.

    >>> round(final_forgetting({"a": [0.5, 0.9, 0.3], "b": [0.2, 0.3], "c": [0.0, 0.7], "d": [0.4]}), 6)
    0.25
    """
    drops = []
    for accs in history.values():
        if len(accs) < 2:
            continue
        best = max(accs[:-1])
        if best > 0:
            drops.append(best - accs[-1])
    return float(np.mean(drops)) if drops else 0.0


def class_accuracy(correct: np.ndarray, keys: np.ndarray) -> dict[int, float]:
    """Mean of ``correct`` per integer class key (e.g. ``level * K + class``)."""
    keys = np.asarray(keys, dtype=np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    hits = np.bincount(inverse, weights=np.asarray(correct, dtype=np.float64), minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq))
    return {int(k): float(h / c) for k, h, c in zip(uniq, hits, counts, strict=True)}
