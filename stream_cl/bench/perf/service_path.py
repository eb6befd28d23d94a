"""Path (c): the full service path -- Kafka in, Redis buffer, metrics served and scraped, drift, checkpoints.

Wired as :func:`stream_cl.service.serve` wires a run (same source, store, checkpointer, drift
monitor and exporter), minus restore; the learner is wrapped to time its steps, which ``serve``
does not expose.
"""

from __future__ import annotations

import threading
import urllib.request
import uuid
from pathlib import Path

import torch

from buffers.open import open_store
from consumers.kafka import KafkaSource
from monitoring.drift import DEFAULT_DRIFT, DriftMonitor, parse_drift
from stream_cl.bench.perf.data import Case
from stream_cl.bench.perf.paths import new_metrics, options, timed_factory
from stream_cl.bench.perf.timing import StepTimes
from stream_cl.checkpoint import CheckpointStore
from stream_cl.checkpointer import Checkpointer
from stream_cl.run import RunParts, run_stream

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
) -> tuple[StepTimes, int]:
    """Learn ``n_records`` of ``topic`` through the service's parts; returns step times and checkpoints written.

    ``redis_url`` ``memory`` keeps the buffer in process; ``drift`` and ``checkpoint_every_s`` (None: only
    the final checkpoint) switch parts off, to see what each costs.
    """
    times = StepTimes()
    run_id = uuid.uuid4().hex[:8]
    spec = redis_url if redis_url == "memory" else f"{redis_url}?name=bench-{run_id}"
    store = open_store(spec, case.buffer_size, device=device, seed=seed)
    metrics = new_metrics()
    exporter = metrics.serve(0)
    stop_scrape = threading.Event()
    scraper = threading.Thread(target=_scrape, args=(exporter.port, stop_scrape), daemon=True)
    scraper.start()
    checkpoints = CheckpointStore(workdir / f"checkpoints-{run_id}", keep=2)
    checkpointer = Checkpointer(
        checkpoints,
        identity={"method": case.method, "model": case.model, "width": case.width},
        every_seconds=checkpoint_every_s,
        metrics=metrics,
    )
    try:
        source = KafkaSource(
            bootstrap,
            topic,
            f"bench-{run_id}",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
        with source:
            run_stream(
                source,
                timed_factory(case, device, seed, times, buffer=store),
                metrics,
                options(case, n_records),
                RunParts(
                    drift=DriftMonitor(parse_drift(DEFAULT_DRIFT), metrics, seed=seed) if drift else None,
                    checkpointer=checkpointer,
                ),
            )
    finally:
        stop_scrape.set()
        scraper.join()
        exporter.stop()
    return times, max((info.id for info in checkpoints.list()), default=0)
