"""Path (c): the full service path -- Kafka in, Redis buffer, metrics served and scraped, drift, checkpoints.

Built from a :class:`~stream_cl.config.Config` by :func:`stream_cl.assemble.assemble`, as ``serve``
builds a run; the learner is wrapped to time its steps, which ``serve`` does not expose.
"""

from __future__ import annotations

import threading
import urllib.request
import uuid
from pathlib import Path

import torch

from stream_cl.assemble import assemble
from stream_cl.bench.perf.data import Case
from stream_cl.bench.perf.paths import learner_hparams
from stream_cl.bench.perf.services import free_port
from stream_cl.bench.perf.timing import StepTimes, TimedLearner
from stream_cl.checkpoint import CheckpointStore
from stream_cl.config import Config
from stream_cl.learner import Learner
from stream_cl.run import run_stream

CHECKPOINT_EVERY_S = 2.0
"""Checkpoint cadence of path (c): short, so every timed run writes several (serve's default is 60 s)."""

SCRAPE_EVERY_S = 1.0
"""How often a Prometheus-like scraper reads ``/metrics`` during path (c)."""


def _scrape(port: int, stop: threading.Event) -> None:
    while not stop.wait(SCRAPE_EVERY_S):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            response.read()


def run_service(
    case: Case,
    *,
    bootstrap: str,
    topic: str,
    redis_url: str,
    n_records: int,
    device: torch.device,
    workdir: Path,
    seed: int = 0,
    session_timeout_ms: int = 6000,
    heartbeat_interval_ms: int = 2000,
    drift: bool = True,
    checkpoint_every_s: float | None = CHECKPOINT_EVERY_S,
    kafka_client: str = "kafka-python",
) -> tuple[StepTimes, int]:
    """Learn ``n_records`` of ``topic`` through the service's parts; returns step times and checkpoints written.

    ``redis_url`` ``memory`` keeps the buffer in process; ``drift`` and ``checkpoint_every_s`` (None: only
    the final checkpoint) switch parts off, to see what each costs. ``kafka_client`` is ``--kafka-client``.
    """
    times = StepTimes()
    run_id = uuid.uuid4().hex[:8]
    checkpoints = workdir / f"checkpoints-{run_id}"
    port = free_port()
    cfg = Config.from_mapping(
        {
            "source": f"kafka://{bootstrap}/{topic}",
            "group": f"bench-{run_id}",
            "kafka_session_timeout_ms": session_timeout_ms,
            "kafka_heartbeat_interval_ms": heartbeat_interval_ms,
            "kafka_client": kafka_client,
            "method": case.method,
            "model": case.model,
            "width": case.width,
            "hparam": learner_hparams(case),
            "seed": seed,
            "device": str(device),
            "buffer": redis_url if redis_url == "memory" else f"{redis_url}?name=bench-{run_id}",
            "buffer_size": case.buffer_size,
            "metrics_port": port,
            "no_drift": not drift,
            "checkpoint_dir": str(checkpoints),
            "checkpoint_every_seconds": checkpoint_every_s,
            "checkpoint_keep": 2,
            "batch_size": case.batch_size,
            "max_records": n_records,
            "probe_fraction": 0.0,  # path (a) has no probe either
            "probe_every": 1 << 62,
            "no_progress": True,
        },
        origin="the throughput benchmark",
    )
    stop_scrape = threading.Event()
    scraper = threading.Thread(target=_scrape, args=(port, stop_scrape), daemon=True)
    with assemble(cfg) as run:

        def make(shape: tuple[int, ...], dtype) -> Learner:
            return TimedLearner(run.make_learner(shape, dtype), times)

        scraper.start()
        try:
            run_stream(run.source, make, run.metrics, run.options, run.parts, state=run.state)
        finally:
            stop_scrape.set()
            scraper.join()
    return times, max((info.id for info in CheckpointStore(checkpoints).list()), default=0)
