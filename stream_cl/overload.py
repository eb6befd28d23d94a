"""What the service does when it falls behind the stream (consumer lag above a threshold).

A learner k times slower than its stream can only learn 1/k of it (Ghunaim et al., "Real-Time
Evaluation in Online Continual Learning", CVPR 2023). The policy chooses who pays: ``queue``
learns everything and lets lag grow; ``subsample`` learns a fraction of the labelled records
and only predicts the rest; ``predict-only`` predicts everything until the lag is back under
the threshold. Records that are not learned keep flowing (predicted, committed), so lag falls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from consumers.record import Record
from monitoring.metrics import Metrics

POLICIES = ("queue", "subsample", "predict-only")


class OverloadPolicy:
    """Decides, per batch, which labelled records are learned while the consumer lags.

    Parameters
    ----------
    policy
        One of :data:`POLICIES`.
    max_lag
        Lag (records behind the end of the topic, summed over partitions) above which the policy
        starts to act (>= 0).
    resume_lag
        Lag at or below which it stops again (default ``max_lag // 2``; at most ``max_lag``). The gap
        keeps a lag that hovers around ``max_lag`` from switching the policy on and off every batch.
    lag
        Returns the current lag, or None when unknown (then the policy does not act).
    fraction
        Share of labelled records still learned under ``subsample``, in (0, 1].
    metrics
        Receives ``streamcl_overload_records_total{policy}`` (labelled records handled while
        behind) and ``streamcl_overloaded`` (1 while behind).
    seed
        Seed of the subsampling draw.

    Examples
    --------
    >>> policy = OverloadPolicy("predict-only", max_lag=10, lag=lambda: 50)
    >>> policy.admit([])
    []
    """

    def __init__(
        self,
        policy: str = "queue",
        *,
        max_lag: int,
        resume_lag: int | None = None,
        lag: Callable[[], int | None],
        fraction: float = 0.5,
        metrics: Metrics | None = None,
        seed: int = 0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if max_lag < 0:
            raise ValueError(f"max_lag must be >= 0, got {max_lag}")
        resume_lag = max_lag // 2 if resume_lag is None else resume_lag
        if not 0 <= resume_lag <= max_lag:
            raise ValueError(f"resume_lag must be in [0, max_lag], got {resume_lag}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.policy = policy
        self.max_lag, self.resume_lag = max_lag, resume_lag
        self.behind = False
        self.fraction = fraction
        self.metrics = metrics
        self._lag = lag
        self._rng = np.random.default_rng(seed)
        if metrics is not None:
            metrics.overload_records.labels(policy=policy)  # the series exists at zero from the start

    def admit(self, records: list[Record]) -> list[Record]:
        """``records``, with the labels of those not to be learned removed (they are predicted only)."""
        if records:
            self.refresh()
        if not self.behind:
            return records
        labelled = np.fromiter((r.label is not None for r in records), dtype=bool, count=len(records))
        if self.metrics is not None:
            self.metrics.overload_records.labels(policy=self.policy).inc(int(labelled.sum()))
        if self.policy == "queue":
            return records
        drop = (
            labelled if self.policy == "predict-only" else labelled & (self._rng.random(len(records)) >= self.fraction)
        )
        return [dataclasses.replace(r, label=None) if d else r for r, d in zip(records, drop, strict=True)]

    def refresh(self) -> None:
        """Judge the lag again (an unknown one leaves the judgement as it was) and set ``streamcl_overloaded``.

        :meth:`admit` does it for each batch; a run calls it too when a poll brought nothing, so a worker
        that lost its partitions in a rebalance (no lag left) stops reading as behind.
        """
        lag = self._lag()
        if lag is not None:
            self.behind = lag > (self.resume_lag if self.behind else self.max_lag)
        if self.metrics is not None:
            self.metrics.overloaded.set(int(self.behind))
