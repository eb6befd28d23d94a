"""The stream-cl paths of the benchmark: the learner alone, and (b) a recorded file through ``run_stream``."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from consumers.prefetch import Prefetcher
from consumers.recorded import RecordedSource
from consumers.source import Source
from consumers.wire import REASONS
from monitoring.metrics import Metrics
from stream_cl.bench.perf.data import Case, Stream
from stream_cl.bench.perf.timing import StepTimes, TimedLearner
from stream_cl.build import build_learner
from stream_cl.learner import Batch, Learner
from stream_cl.run import RUN_REASONS, LearnerFactory, RunOptions, run_stream


def learner_hparams(case: Case) -> dict:
    if case.method == "er":
        return {"lr": case.lr, "replay_batch_size": case.replay_batch_size, **case.hparams}
    return dict(case.hparams)


def build(case: Case, shape: tuple[int, ...], dtype, device: torch.device, seed: int, **kwargs) -> Learner:
    return build_learner(
        case.method,
        case.model,
        shape,
        dtype,
        device=device,
        seed=seed,
        buffer_size=case.buffer_size,
        width=case.width,
        hparams=learner_hparams(case),
        **kwargs,
    )


def timed_factory(case: Case, device: torch.device, seed: int, times: StepTimes, **kwargs) -> LearnerFactory:
    def make(shape: tuple[int, ...], dtype) -> Learner:
        return TimedLearner(build(case, shape, dtype, device, seed, **kwargs), times)

    return make


def run_learner_only(case: Case, stream: Stream, device: torch.device, seed: int = 0) -> StepTimes:
    """The stream-cl learner's ``observe`` on preloaded tensors: the method's cost with no run loop."""
    learner = build(case, stream.x.shape[1:], stream.x.dtype, device, seed)
    xs = torch.from_numpy(stream.x)
    labels = [(stream.names[k],) for k in stream.y.tolist()]
    times = StepTimes()
    for begin in range(0, len(stream), case.batch_size):
        start = time.perf_counter()
        learner.observe(Batch(xs[begin : begin + case.batch_size], labels[begin : begin + case.batch_size]))
        times.add(start, time.perf_counter(), len(labels[begin : begin + case.batch_size]))
    return times


def options(case: Case, n_records: int) -> RunOptions:
    """Run options of the stream-cl paths; probe evaluation is off (path a has none either)."""
    return RunOptions(batch_size=case.batch_size, max_records=n_records, probe_every=1 << 62, progress=False)


def new_metrics() -> Metrics:
    return Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)


def prefetched(source: Source, case: Case, n_records: int, timeout_s: float = 0.0) -> Prefetcher:
    return Prefetcher(source, depth=4, batch_size=case.batch_size, max_records=n_records, timeout_s=timeout_s)


def run_recorded(
    case: Case, path: Path, n_records: int, device: torch.device, *, prefetch: bool, seed: int = 0
) -> StepTimes:
    """Path (b): recorded file → (prefetcher →) ``run_stream`` → learner, with a probe fraction of 0."""
    times = StepTimes()
    source: Source = RecordedSource(path)
    if prefetch:
        source = prefetched(source, case, n_records)
    with source:
        run_stream(source, timed_factory(case, device, seed, times), new_metrics(), options(case, n_records))
    return times
