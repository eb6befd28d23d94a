"""Parts of PL-FMS (HLE, Lee et al. ICCV 2023), each small and testable on its own.

* :func:`fms_keep_probability`: flexible memory sampling.
* :class:`ImportanceScores`: CLIB's sample-wise importance (loss decrease) per memory slot, and
  the victim hook of :class:`buffers.balanced.LargestClassPolicy`: memory written on arrival;
  when full, the sample of lowest importance of the most populated class (counting the incoming
  sample) is replaced.
* :class:`AdaptiveLR` and :class:`OfficialAdaptiveLR`: CLIB's adaptive learning rate (alternate two
  rates, Welch t-test on the memory-loss decrease obtained under each), ticked at every memory
  re-scoring or on the official code's schedule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import ttest_ind

from stream_cl.methods.common import require_number


def fms_keep_probability(
    n: int, first_seen: np.ndarray, n_classes_seen: int, total: int, factor: float = 1.0
) -> np.ndarray:
    """``min(1, (n - n_c) · |C_seen| / (factor · N))`` for each sample's class first-seen count ``n_c``.

    >>> fms_keep_probability(1000, np.array([0, 900, 1000]), 40, 50_000).tolist()
    [0.8, 0.08, 0.0]
    """
    p = (n - np.asarray(first_seen, dtype=np.float64)) * n_classes_seen / (factor * total)
    return np.clip(p, 0.0, 1.0)


class ImportanceScores:
    """CLIB sample-wise importance of every memory slot, and the victim hook of the eviction policy.

    Eviction itself is :class:`buffers.balanced.LargestClassPolicy` (``admit="always"``): the
    victim class is the most populated one counting the incoming sample; :meth:`victim` then picks
    its sample of lowest importance. :meth:`written` gives new samples their initial score.

    Parameters
    ----------
    capacity
        Memory size M.
    beta
        EMA ratio of the importance update (CLIB: 0.9).
    """

    def __init__(self, capacity: int, *, beta: float = 0.9) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        require_number("beta", beta, ge=0, lt=1)
        self.capacity = capacity
        self.beta = beta
        self.keys = np.full(capacity, -1, dtype=np.int64)
        self.score = np.zeros(capacity, dtype=np.float64)
        self.prev_loss = np.full(capacity, np.nan, dtype=np.float64)
        self.writes = np.zeros(capacity, dtype=np.int64)  # samples written to each slot so far
        self.used: list[int] = []

    def victim(self, candidates: np.ndarray) -> int:
        """The candidate slot (all of the victim class) of lowest importance."""
        return int(candidates[np.argmin(self.score[candidates])])

    def written(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """Initial scores of samples just stored: their class's mean score (first of a class: 0 when
        appended, the mean of all stored samples when replacing)."""
        # In arrival order: a sample's initial score depends on those written before it.
        for slot, key in zip(np.asarray(slots).tolist(), np.asarray(keys).tolist(), strict=True):
            if slot < 0:
                continue
            filled = self.keys >= 0
            filled[slot] = False
            same = filled & (self.keys == key)
            if same.any():
                init = self.score[same].mean()
            else:
                init = self.score[filled].mean() if self.keys[slot] >= 0 and filled.any() else 0.0
            self.keys[slot], self.score[slot], self.prev_loss[slot] = key, init, np.nan
            self.writes[slot] += 1

    def note_used(self, slots: np.ndarray) -> None:
        """Remember memory slots used in a training batch (a multiset, until the next update)."""
        self.used.extend(np.asarray(slots, dtype=np.int64).tolist())

    def update_importance(self, loss: np.ndarray) -> float | None:
        """CLIB update from the current loss of every stored sample; returns the mean loss decrease.

        Δ = mean over samples still stored since the last update of (loss now - loss then); each used
        slot k gets ``s_k -= (1 - beta) · (Δ - mean_U(s) / |U|)`` (samples used while the memory
        loss fell gain importance). Returns ``-Δ`` (None when no sample has a previous loss).
        """
        loss = np.asarray(loss, dtype=np.float64)
        size = len(loss)
        valid = ~np.isnan(self.prev_loss[:size])
        delta = float(np.mean(loss[valid] - self.prev_loss[:size][valid])) if valid.any() else None
        if delta is not None and self.used:
            used = np.asarray(self.used, dtype=np.int64)
            # numpy's in-place fancy update applies once per distinct slot, as in CLIB.
            self.score[used] -= (1.0 - self.beta) * (delta - self.score[used].mean() / len(used))
        self.used = []
        self.prev_loss[:size] = loss
        return None if delta is None else -delta

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": torch.from_numpy(self.keys.copy()),
            "score": torch.from_numpy(self.score.copy()),
            "prev_loss": torch.from_numpy(self.prev_loss.copy()),
            "writes": torch.from_numpy(self.writes.copy()),
            "used": list(self.used),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = state["keys"].numpy().copy()
        self.score = state["score"].numpy().copy()
        self.prev_loss = state["prev_loss"].numpy().copy()
        # Checkpoints written before the counter existed: the first official window then compares all slots.
        self.writes = state["writes"].numpy().copy() if "writes" in state else np.zeros_like(self.writes)
        self.used = [int(u) for u in state["used"]]


class _TwoRates:
    """What both schedules of CLIB's adaptive learning rate share: a high rate and ``low = step · high``,
    the gains credited to each, and the one-sided Welch t-test (low > high) that moves both rates."""

    def __init__(
        self,
        lr: float,
        *,
        step: float = 0.95,
        period: int = 10,
        length: int = 10,
        warmup: int = 20,
        significance: float = 0.05,
    ) -> None:
        # named as PL-FMS's hyper-parameters, which is how they are set
        require_number("lr_step", step, gt=0, lt=1)
        require_number("lr_period", period, integer=True, gt=0)
        require_number("lr_length", length, integer=True, ge=2)
        require_number("lr_warmup", warmup, integer=True, ge=0)
        require_number("significance", significance, gt=0, lt=0.5)
        self.high, self.low = lr, lr * step
        self.step, self.period, self.length, self.warmup, self.significance = step, period, length, warmup, significance
        self.is_high = True
        self.high_gains: list[float] = []
        self.low_gains: list[float] = []

    @property
    def lr(self) -> float:
        return self.high if self.is_high else self.low

    def _judge(self) -> bool:
        """The t-test on the gains: below ``significance`` lowers both rates, above ``1 - significance``
        raises both, and the gains restart; returns whether it decided."""
        p = float(ttest_ind(self.low_gains, self.high_gains, equal_var=False, alternative="greater").pvalue)
        if p < self.significance:
            self.high, self.low = self.low, self.low * self.step
        elif p > 1.0 - self.significance:
            self.high, self.low = self.high / self.step, self.high
        else:
            return False
        self.high_gains, self.low_gains = [], []
        return True


class AdaptiveLR(_TwoRates):
    """CLIB's adaptive learning rate, ticked once per memory re-scoring with that step's loss decrease.

    Alternates a high rate and ``low = step · high`` every ``period`` ticks (after ``warmup``
    ticks); records the mean loss decrease under each; with ``length`` values of both, a one-sided
    Welch t-test (low > high) below ``significance`` lowers both rates, above ``1 - significance``
    raises both.
    """

    def __init__(self, lr: float, **schedule: Any) -> None:
        super().__init__(lr, **schedule)
        self.ticks = 0
        self.window: list[float] = []

    def tick(self, decrease: float | None) -> float:
        """Account one re-scoring's mean memory-loss decrease; returns the rate to use now."""
        self.ticks += 1
        if self.ticks <= self.warmup:
            return self.lr
        if decrease is not None:
            self.window.append(decrease)
        if (self.ticks - self.warmup) % self.period:
            return self.lr
        gains = self.high_gains if self.is_high else self.low_gains
        if self.window:
            gains.append(float(np.mean(self.window)))
            del gains[: -self.length]
        self.window = []
        self.is_high = not self.is_high
        if len(self.high_gains) >= self.length and len(self.low_gains) >= self.length:
            self._judge()
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("high", "low", "is_high", "ticks", "window", "high_gains", "low_gains")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, list(value) if isinstance(value, list) else value)


class OfficialAdaptiveLR(_TwoRates):
    """CLIB's adaptive learning rate on the schedule of the official HLE code.

    It counts once per temporary batch, and only when that batch's last update ended on a memory
    re-scoring (``updates % imp_update_period == 0``): with the CIFAR settings (24 updates per batch,
    re-scoring every 5) once every 5 batches, 24 times less often than :class:`AdaptiveLR`. Every
    ``period`` counts it switches between the high and the low rate; at a switch after ``warmup``
    counts, the rate just ending is credited with the memory-loss decrease over its whole window:
    the mean, over slots whose sample was not replaced during the window, of (loss at the window's
    start - loss now). With ``length`` values of both, a one-sided Welch t-test (low > high) below
    ``significance`` lowers both rates, above ``1 - significance`` raises both; either way the lists
    restart and the rate in use flips once more, as in the official code.
    """

    def __init__(self, lr: float, **schedule: Any) -> None:
        super().__init__(lr, **schedule)
        self.counts = 0
        self.start_loss: np.ndarray | None = None
        self.start_writes: np.ndarray | None = None

    def count(self, loss: np.ndarray, writes: np.ndarray) -> float:
        """One count with the latest loss of every stored sample (NaN: not scored since written) and
        each slot's write counter; returns the rate to use now."""
        self.counts += 1
        if self.counts % self.period:
            return self.lr
        if self.start_loss is not None and self.counts > self.warmup:
            n = min(len(self.start_loss), len(loss))
            before, now = self.start_loss[:n], np.asarray(loss, dtype=np.float64)[:n]
            kept = (writes[:n] == self.start_writes[:n]) & ~np.isnan(before) & ~np.isnan(now)
            if kept.any():
                gains = self.high_gains if self.is_high else self.low_gains
                gains.append(float(np.mean(before[kept] - now[kept])))
                del gains[: -self.length]
        self.start_loss = np.array(loss, dtype=np.float64)
        self.start_writes = np.array(writes, dtype=np.int64)
        self.is_high = not self.is_high
        if len(self.high_gains) == len(self.low_gains) >= self.length and self._judge():
            self.is_high = not self.is_high
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        arrays = {
            k: None if getattr(self, k) is None else torch.from_numpy(getattr(self, k).copy())
            for k in ("start_loss", "start_writes")
        }
        return arrays | {k: getattr(self, k) for k in ("high", "low", "is_high", "counts", "high_gains", "low_gains")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.numpy().copy()
            setattr(self, key, list(value) if isinstance(value, list) else value)
