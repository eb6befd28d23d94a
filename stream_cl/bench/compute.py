"""What a benchmark run spends learning: optimizer steps and CPU-seconds, and their ratio to a reference method.

Methods are compared at equal compute, or with their compute next to their accuracy: a step counter
on the learner's optimizer (a post-step hook, so a step the guard or an AMP scaler skips is not
counted) and the process CPU time spent inside ``observe``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from stream_cl.learner import Learner


class Compute:
    """Counts ``learner``'s optimizer steps and the CPU-seconds spent in :meth:`learning` blocks."""

    def __init__(self, learner: Learner) -> None:
        self.steps = 0
        self.cpu_seconds = 0.0
        learner.optimizer.register_step_post_hook(self._count)

    def _count(self, *_: object) -> None:
        self.steps += 1

    @contextmanager
    def learning(self) -> Iterator[None]:
        started = time.process_time()
        try:
            yield
        finally:
            self.cpu_seconds += time.process_time() - started


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is 0.

    >>> ratio(30.0, 10.0), ratio(1.0, 0.0)
    (3.0, None)
    """
    if value is None or not reference:
        return None
    return value / reference


def times(value: float | None) -> str:
    """A ratio for a table: ``3.1×``, or ``–`` when there is none."""
    return "–" if value is None else f"{value:.1f}×"
