"""The long run: a million small records through the MLP learner, RSS sampled along the way."""

from __future__ import annotations

import gc
import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from consumers.record import Poll
from consumers.source import Offsets, Source
from consumers.synthetic import SyntheticSource
from monitoring.probe import ProbeSet
from stream_cl.bench.perf.data import Case
from stream_cl.bench.perf.paths import build, new_metrics
from stream_cl.run import RunOptions, RunParts, run_stream

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class RssTrace:
    """RSS after every ``every`` records polled."""

    records: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    seconds: float = 0.0


class RssSampling:
    """A source wrapper that samples RSS every ``every`` records and shows progress."""

    def __init__(self, source: Source, trace: RssTrace, every: int, total: int, progress: bool) -> None:
        self.source, self.trace, self.every = source, trace, every
        self.poll_timeout_s, self.fetches_ahead = source.poll_timeout_s, source.fetches_ahead
        self.polled = self._next = 0
        self.bar = tqdm(total=total, unit="rec", desc="memory run", disable=not progress, mininterval=2.0)

    @property
    def exhausted(self) -> bool:
        return self.source.exhausted

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        poll = self.source.poll(timeout_s, max_records)
        self.polled += len(poll)
        self.bar.update(len(poll))
        if self.polled >= self._next:
            self.trace.records.append(self.polled)
            self.trace.rss.append(rss_bytes())
            self._next += self.every
        return poll

    def commit(self, offsets: Offsets) -> None:
        self.source.commit(offsets)

    def close(self) -> None:
        self.bar.close()
        self.source.close()

    def __enter__(self) -> RssSampling:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_memory(
    n_records: int, *, dim: int = 8, batch_size: int = 10, samples: int = 200, seed: int = 0, progress: bool = True
) -> RssTrace:
    """ER on the MLP over ``n_records`` synthetic ``dim``-d vectors (probe on, 5 %); RSS at ``samples`` points."""
    case = Case("memory", "er", "mlp", "features", n_records=n_records, n_classes=10, dim=dim, batch_size=batch_size)
    device = torch.device("cpu")
    trace = RssTrace()
    gc.collect()
    source = RssSampling(
        SyntheticSource(n_records, dim=dim, seed=seed), trace, max(1, n_records // samples), n_records, progress
    )
    opts = RunOptions(batch_size=batch_size, max_records=n_records, probe_every=50_000, progress=False)
    started = time.perf_counter()
    with source:
        run_stream(
            source,
            lambda shape, dtype: build(case, shape, dtype, device, seed),
            new_metrics(),
            opts,
            RunParts(probe=ProbeSet(fraction=0.05, seed=seed)),
        )
    trace.seconds = time.perf_counter() - started
    trace.records.append(source.polled)
    trace.rss.append(rss_bytes())
    return trace


def summarise(trace: RssTrace) -> dict:
    """Start/end RSS (MiB), growth over the second half (MiB), records/s."""
    rss = np.asarray(trace.rss, dtype=np.float64) / 2**20
    half = len(rss) // 2
    return {
        "records": trace.records[-1] if trace.records else 0,
        "seconds": trace.seconds,
        "records_per_second": (trace.records[-1] / trace.seconds) if trace.seconds else 0.0,
        "rss_start_mib": float(rss[0]) if len(rss) else 0.0,
        "rss_after_first_sample_mib": float(rss[1]) if len(rss) > 1 else 0.0,
        "rss_end_mib": float(rss[-1]) if len(rss) else 0.0,
        "rss_peak_mib": float(rss.max()) if len(rss) else 0.0,
        "rss_growth_second_half_mib": float(rss[-1] - rss[half]) if len(rss) > 1 else 0.0,
    }
