"""Task-level continual-learning metrics from an accuracy matrix (spec §3).

``a[i, j]`` is the accuracy (%) on task j's test set after training task i (0-based, j ≤ i;
entries above the diagonal are ignored).
"""

from __future__ import annotations

import numpy as np


def final_accuracy(a: np.ndarray) -> float:
    """A_T = mean_j a[T−1, j]."""
    return float(np.mean(a[-1]))


def average_incremental_accuracy(a: np.ndarray) -> float:
    """(1/T) Σ_i mean_{j ≤ i} a[i, j]."""
    return float(np.mean([np.mean(a[i, : i + 1]) for i in range(len(a))]))


def forgetting(a: np.ndarray) -> float | None:
    """Chaudhry et al.: (1/(T−1)) Σ_{j<T−1} (max_{l<T−1} a[l, j] − a[T−1, j]); None for T = 1.

    >>> forgetting(np.array([[80.0, 0], [50.0, 60.0]]))
    30.0
    """
    t = len(a)
    if t < 2:
        return None
    best = np.array([a[j : t - 1, j].max() for j in range(t - 1)])
    return float(np.mean(best - a[-1, : t - 1]))


def forgetting_code(a: np.ndarray) -> float:
    """OnPro code's variant: (1/T) Σ_j (max_{l ≤ T−1} a[l, j] − a[T−1, j]) (max includes the last row).

    >>> forgetting_code(np.array([[80.0, 0], [50.0, 60.0]]))
    15.0
    """
    t = len(a)
    best = np.array([a[j:, j].max() for j in range(t)])
    return float(np.mean(best - a[-1]))


def summarise(values: list[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (ddof = 1; 0 for one run) of per-run values."""
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0}
