"""Step timings of one benchmark run, and the learner wrapper that takes them inside the run loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stream_cl.learner import Batch, Learner, Observation, Prediction


@dataclass
class StepTimes:
    """Start time, duration and size of every learner step of one run, and process CPU time at its end.

    ``extra_cpu_s`` is CPU time spent outside this process for the run (the broker and Redis of path c).
    """

    starts: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    extra_cpu_s: float = 0.0

    def add(self, start: float, end: float, size: int) -> None:
        self.starts.append(start)
        self.durations.append(end - start)
        self.sizes.append(size)
        self.cpu.append(time.process_time())

    def samples_per_cpu_second(self) -> float:
        """Records per CPU-second of this process (every thread), from the first step's end to the last's.

        CPU time is what a path costs whatever else shares the cores; it counts the prefetch, Kafka fetch
        and checkpoint threads too, which wall time on an idle many-core machine would hide.
        """
        if len(self.cpu) < 2 or self.cpu[-1] <= self.cpu[0]:
            return 0.0
        return sum(self.sizes[1:]) / (self.cpu[-1] - self.cpu[0])

    def samples_per_second(self) -> float:
        """Records per second from the first step's start to the last step's start.

        That window holds whole cycles only (step + everything the path does between steps), so
        set-up before the first record (model build, broker join) and the drain after the last one
        count for no path.
        """
        if len(self.starts) < 2:
            return 0.0
        return sum(self.sizes[:-1]) / (self.starts[-1] - self.starts[0])

    def percentiles_ms(self) -> dict[str, float]:
        ms = np.asarray(self.durations) * 1e3
        return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} if len(ms) else {}


class TimedLearner:
    """A learner that notes the start and duration of each ``observe``; everything else is passed on."""

    def __init__(self, inner: Learner, times: StepTimes) -> None:
        self.inner = inner
        self.times = times
        self.name = inner.name
        self.labels = inner.labels
        self.buffer = inner.buffer

    def observe(self, batch: Batch) -> Observation:
        start = time.perf_counter()
        observation = self.inner.observe(batch)
        self.times.add(start, time.perf_counter(), len(batch.labels))
        return observation

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.inner.predict(x)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
