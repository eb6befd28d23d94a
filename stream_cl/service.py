"""The long-running service: ``run`` plus checkpoints, graceful drain, health and predictions out.

Start-up restores the newest valid checkpoint and opens the source at that checkpoint's offsets,
so the restored model neither skips nor relearns a record. SIGTERM/SIGINT only set the stop
flag: the loop finishes its batch, commits, writes a final checkpoint and returns; a watchdog
ends the process with exit code 3 if that takes longer than ``drain_timeout``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from consumers.source import Offsets, Source
from consumers.urls import KafkaUrl, is_kafka_url
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.checkpoint import CheckpointStore
from stream_cl.checkpointer import Checkpointer, Restored, restore
from stream_cl.config import ServiceConfig
from stream_cl.device import pick_device
from stream_cl.errors import ConfigError
from stream_cl.overload import OverloadPolicy
from stream_cl.predictions import Predictions, open_sink
from stream_cl.run import RunState, run_stream
from stream_cl.sources import open_dead_letters, open_source
from stream_cl.summary import Summary
from stream_cl.wiring import check_settings, drift_monitor, learner_factory, make_metrics, run_options

log = logging.getLogger("stream_cl.serve")

DRAIN_EXIT_CODE = 3
"""Exit code when a drain did not finish within ``drain_timeout`` (the process is ended)."""


def serve(cfg: ServiceConfig, stop: threading.Event | None = None) -> Summary:
    """Run the service until its source ends (or idles out) or ``stop`` is set; returns the summary."""
    run = cfg.run
    stop = stop or threading.Event()
    device = pick_device(run["device"])
    identity = {"method": run["method"], "model": run["model"], "width": run["width"]}
    check_settings(run)
    metrics = make_metrics(run, device)
    make_learner = learner_factory(run, device)
    ready = threading.Event()
    source: Source | None = None

    def is_ready() -> bool:  # restored, source open and (for Kafka) partitions assigned
        assignment = getattr(source, "assignment", None)
        return ready.is_set() and (assignment is None or bool(assignment()))

    exporter = None
    if run["metrics_port"]:
        exporter = metrics.serve(run["metrics_port"], run["metrics_addr"], ready=is_ready)
        log.info("serving /metrics, /healthz, /readyz on %s:%d", exporter.addr, exporter.port)
    try:
        probe = ProbeSet(fraction=run["probe_fraction"], seed=run["seed"])
        store, state, restored = _restore(cfg, make_learner, identity, probe)
        checkpointer = None
        if store is not None:
            checkpointer = Checkpointer(
                store,
                identity=identity,
                every_records=cfg.checkpoint.every_records,
                every_seconds=cfg.checkpoint.every_seconds,
                restored=restored,
                metrics=metrics,
                probe=probe,
            )
        with (
            _open_source(cfg, restored.offsets if restored else {}, from_checkpoint=store is not None) as source,
            open_dead_letters(
                run["source"],
                dead_letter_out=run["dead_letter_out"],
                dead_letter_topic=run["dead_letter_topic"],
                client_options=cfg.kafka.client_options(),
            )
            or nullcontext() as dead_letters,
        ):
            if restored is not None:
                _commit_restored(source, restored.offsets)
            predictions = _predictions(cfg, checkpointer, metrics)
            ready.set()
            try:
                summary, _ = run_stream(
                    source,
                    make_learner,
                    metrics,
                    probe,
                    run_options(run),
                    dead_letters=dead_letters,
                    state=state,
                    stop=stop,
                    drift=drift_monitor(run, metrics),
                    checkpointer=checkpointer,
                    overload=_overload(cfg, source, metrics, run["seed"]),
                    predictions=predictions,
                )
            finally:
                ready.clear()
                if predictions is not None:
                    predictions.close()
    finally:
        if exporter is not None:
            exporter.stop()
    summary.model, summary.device = run["model"], str(device)
    return summary


@contextmanager
def stop_on_signals(stop: threading.Event, drain_timeout: float) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT set ``stop``, and a watchdog ends the process (exit code
    :data:`DRAIN_EXIT_CODE`) if the block has not finished ``drain_timeout`` seconds later."""
    drained = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()  # the only thing a handler does; the loop sees it between batches

    def watchdog() -> None:
        stop.wait()
        if drained.is_set():
            return
        log.info("stopping: draining (bound %.1f s)", drain_timeout)
        if not drained.wait(drain_timeout):
            log.error("drain did not finish within %.1f s; exiting with code %d", drain_timeout, DRAIN_EXIT_CODE)
            os._exit(DRAIN_EXIT_CODE)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=watchdog, name="drain-watchdog", daemon=True).start()
    try:
        yield
    finally:
        drained.set()
        stop.set()  # releases the watchdog
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _restore(
    cfg: ServiceConfig, make_learner: Any, identity: dict[str, Any], probe: ProbeSet
) -> tuple[CheckpointStore | None, RunState, Restored | None]:
    if cfg.checkpoint.dir is None:
        log.warning("no --checkpoint-dir: the model is lost when the service stops")
        return None, RunState(), None
    store = CheckpointStore(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
    state, restored = restore(store, make_learner, identity, probe)
    return store, state, restored


def _open_source(cfg: ServiceConfig, start_offsets: Offsets, *, from_checkpoint: bool) -> Source:
    """The source, positioned at ``start_offsets``.

    With checkpoints, the checkpoint (not the group's committed offsets) decides where every partition
    starts: a partition it holds no offset for has taught the model nothing yet, so it starts at its
    earliest record (offset 0, reset to the log start if retention removed it).
    """
    spec = cfg.run["source"]
    if spec is None:
        raise ConfigError("serve needs --source (a kafka://HOST:PORT/TOPIC URL or a recorded-stream file)")
    start = dict(start_offsets)
    if from_checkpoint and is_kafka_url(spec):
        url = KafkaUrl.parse(spec)
        for partition in _partitions(url.bootstrap, url.topic, cfg.kafka.client_options()):
            start.setdefault((url.topic, partition), 0)
    return open_source(
        spec,
        group=cfg.run["group"],
        start_offsets=start,
        session_timeout_ms=cfg.kafka.session_timeout_ms,
        heartbeat_interval_ms=cfg.kafka.heartbeat_interval_ms,
        client_options=cfg.kafka.client_options(),
    )


def _partitions(bootstrap: str, topic: str, client_options: dict[str, Any]) -> set[int]:
    """The topic's partitions (empty if it does not exist yet: then there is nothing to have skipped)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="stream-cl", **client_options)
    except KafkaError as err:
        raise ConnectionError(f"cannot reach Kafka at {bootstrap}: {err}") from err
    try:
        return set(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


def _commit_restored(source: Source, offsets: Offsets, timeout_s: float = 10.0) -> None:
    """Commit the restored offsets once partitions are assigned, so the group agrees with the model."""
    assignment = getattr(source, "assignment", None)
    deadline = time.monotonic() + timeout_s
    while assignment is not None and not assignment() and time.monotonic() < deadline:
        time.sleep(0.05)
    source.commit(offsets)


def _predictions(cfg: ServiceConfig, checkpointer: Checkpointer | None, metrics: Metrics) -> Predictions | None:
    if cfg.predictions.url is None:
        return None
    sink = open_sink(cfg.predictions.url, **cfg.kafka.client_options())
    return Predictions(
        sink,
        which=cfg.predictions.which,
        version=(lambda: checkpointer.version) if checkpointer is not None else (lambda: 0),
        metrics=metrics,
    )


def _overload(cfg: ServiceConfig, source: Source, metrics: Metrics, seed: int) -> OverloadPolicy | None:
    if cfg.overload.max_lag is None:
        return None
    lag = getattr(source, "lag", None)
    if lag is None:
        raise ConfigError("--max-lag needs a source that reports its lag (Kafka)")
    return OverloadPolicy(
        cfg.overload.policy,
        max_lag=cfg.overload.max_lag,
        lag=lambda: _total(lag()),
        fraction=cfg.overload.fraction,
        metrics=metrics,
        seed=seed,
    )


def _total(lag: Any) -> int | None:
    """Lag summed over partitions (sources report an int or a per-partition mapping)."""
    if lag is None or isinstance(lag, int):
        return lag
    return sum(lag.values())
