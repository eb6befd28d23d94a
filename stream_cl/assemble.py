"""The one wiring path: a :class:`~stream_cl.config.Config` in, the parts of a run out.

``stream-cl run``, ``stream-cl serve`` and the benchmarks all build their runs here; ``run`` is
``serve`` without checkpoints and predictions. Start-up restores the newest valid checkpoint and
opens the source at that checkpoint's offsets, so the restored model neither skips nor relearns
a record.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from buffers.open import open_store
from consumers.open import open_dead_letters, open_source
from consumers.prefetch import Prefetcher
from consumers.source import Instrumented, Source
from consumers.urls import KafkaUrl, is_kafka_url
from consumers.wire import REASONS
from monitoring.drift import DriftMonitor, parse_drift
from monitoring.exporter import Check, Exporter
from monitoring.labeljoin import JoinMetrics
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner, model_input_shape
from stream_cl.checkpoint import CheckpointStore
from stream_cl.checkpointer import Checkpointer, Restored, restore
from stream_cl.config import DEFAULT_METRICS_PORT, Config
from stream_cl.delayed import DelayedLabels
from stream_cl.device import pick_device
from stream_cl.errors import ConfigError
from stream_cl.group import LOCKSTEP_METHODS, Group, GroupCheckpointer
from stream_cl.learner import Learner, LearnerFactory, RunState
from stream_cl.methods import hyper_parameters
from stream_cl.models import UnsupportedInput, check_size
from stream_cl.overload import OverloadPolicy
from stream_cl.pending import MemoryPending, PendingStore
from stream_cl.pending_redis import open_redis_pending
from stream_cl.predictions import Predictions, open_sink
from stream_cl.publishing import Heartbeat
from stream_cl.run import RUN_REASONS, CountOnly, RunOptions, RunParts

log = logging.getLogger("stream_cl")


@dataclass
class Assembly:
    """Everything :func:`stream_cl.run.run_stream` takes, built and opened from a config."""

    source: Source
    make_learner: LearnerFactory
    metrics: Metrics
    options: RunOptions
    parts: RunParts
    state: RunState
    device: torch.device
    exporter: Exporter | None


def default_stream() -> Path:
    """The recorded stream shipped with the package (class-incremental Fashion-MNIST slice)."""
    return Path(str(resources.files("consumers.data").joinpath("fashion_mnist_ci.rec.gz")))


@contextmanager
def assemble(
    cfg: Config, ready: threading.Event | None = None, *, require_topic: bool = False, group: Group | None = None
) -> Iterator[Assembly]:
    """Open the run ``cfg`` describes; everything opened is closed when the block exits.

    ``ready`` is set by the caller once the loop runs; ``/readyz`` answers 200 only while it is
    set, the source has partitions (Kafka) and dead letters can be delivered. ``/healthz`` answers
    503 once the loop has not turned for ``--stall-seconds`` (it is stuck),
    and so does ``/readyz``. ``require_topic``
    makes a missing Kafka topic an error (a service may instead start before its producers).
    ``group`` makes this run one worker of a group learning one model (:mod:`stream_cl.group`).
    """
    check_learner(cfg)
    if cfg.buffer.spec != "memory":  # the learner opens its buffer at the first record: fail now, not then
        open_store(cfg.buffer.spec, cfg.buffer.size, policy=cfg.buffer.policy)
    device = pick_device(cfg.learner.device)
    metrics = make_metrics(cfg, device)
    make_learner = learner_factory(cfg, device)
    if group is not None:
        check_group(cfg, group.world_size)
        make_learner = group.wrap(make_learner)
    probe = ProbeSet(fraction=cfg.run.probe_fraction, seed=cfg.learner.seed)
    accuracy = PrequentialAccuracy()
    try:
        state, restored, checkpointer = _restore(
            cfg, make_learner, probe, accuracy, metrics, writer=group is None or group.rank == 0
        )
    except Exception as err:
        if group is not None:  # the peers wait in check_restored: they fail with this reason, not a timeout
            group.restore_failed(err)
        raise
    if group is not None:
        _check_restored(group, restored, checkpointer)
    url = cfg.source.url or str(default_stream())
    ready = ready or threading.Event()
    with ExitStack() as stack:
        if checkpointer is not None:  # first in, last out: the lock covers the final checkpoint
            stack.callback(checkpointer.store.close)
        source: Source | None = None
        parts = RunParts(probe=probe, accuracy=accuracy, checkpointer=checkpointer, lockstep=group)
        if group is not None and checkpointer is not None:
            parts.checkpointer = GroupCheckpointer(group, checkpointer)

        def is_alive() -> bool:
            # A turn of a healthy loop, idle or not, takes one poll (at most 0.5 s for Kafka) and one batch; the
            # margin is for what a turn may legitimately block on: a first model build on a cold GPU, a large
            # batch, a probe evaluation, a checkpoint snapshot, a group's collective waiting for a slow peer.
            return parts.heartbeat.alive(cfg.metrics.stall_seconds)

        def is_ready() -> bool:
            assigned = not isinstance(source, Instrumented) or bool(source.assignment())
            # the Redis pending store is reachable, and the label topic's dead letters have somewhere to go
            labels_ok = parts.labels is None or (parts.labels.healthy and parts.labels.dead_letters.healthy)
            return ready.is_set() and is_alive() and assigned and parts.dead_letters.healthy and labels_ok

        exporter = _serve_metrics(cfg, metrics, healthy=is_alive, ready=is_ready)
        if exporter is not None:
            stack.callback(exporter.stop)
        source = open_source(
            url,
            group=cfg.source.group,
            start_offsets=restored.offsets if restored else None,
            from_checkpoint=checkpointer is not None,
            require_topic=require_topic,
            kafka_options=cfg.kafka.consumer_options(),
            kafka_client=cfg.kafka.client,
            run_offsets=None if group is None else group.run_offsets,
        )
        if cfg.source.prefetch and not source.fetches_ahead:
            source = Prefetcher(
                source, depth=cfg.source.prefetch, batch_size=cfg.run.batch_size, max_records=cfg.run.max_records
            )
        stack.enter_context(source)
        sink = open_dead_letters(
            url,
            dead_letter_out=cfg.source.dead_letter_out,
            dead_letter_topic=cfg.source.dead_letter_topic,
            client_options=cfg.kafka.client_options(),
            spool_dir=_spool_dir(cfg),
        )
        if sink is not None:
            parts.dead_letters = stack.enter_context(sink)
        else:
            parts.dead_letters = CountOnly()
        if cfg.predictions.url is not None:
            parts.predictions = Predictions(
                open_sink(cfg.predictions.url, **cfg.kafka.client_options()),
                which=cfg.predictions.which,
                version=(lambda: checkpointer.version) if checkpointer is not None else (lambda: 0),
                metrics=metrics,
            )
            stack.callback(parts.predictions.close)
        parts.drift = drift_monitor(cfg, metrics)
        parts.overload = _overload(cfg, source, metrics)
        parts.labels = _delayed_labels(cfg, stack, metrics, restored, require_topic, parts.heartbeat)
        if checkpointer is not None:
            checkpointer.pending = parts.labels
        yield Assembly(source, make_learner, metrics, run_options(cfg), parts, state, device, exporter)


def check_group(cfg: Config, world_size: int) -> None:
    """Raise ConfigError if ``cfg`` cannot run as a group of ``world_size`` workers."""
    if cfg.learner.method not in LOCKSTEP_METHODS:
        raise ConfigError(f"--method {cfg.learner.method} cannot learn with several workers yet")
    if dict(cfg.learner.hparam).get("iterations", 1) != 1:  # the group agrees on one step per batch
        raise ConfigError("--hparam iterations must be 1 with several workers")
    if world_size > 1 and not (cfg.source.url or "").startswith("kafka://"):
        # only a consumer group splits a stream: every worker would learn all of a file
        raise ConfigError("several workers need a Kafka source (kafka://HOST:PORT/TOPIC)")
    if world_size > 1 and cfg.labels.url is not None:
        # joined samples are learned outside the group's agreed steps, so the workers would not step together
        raise ConfigError("--labels cannot be used with several workers yet")


def check_hparams(method: str, hparams: dict) -> None:
    """Raise ConfigError for keys ``method``'s constructor does not take."""
    known = hyper_parameters(method)
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {method}; known: {', '.join(known)}"
        )


def check_learner(cfg: Config) -> None:
    """Raise ConfigError for hyper-parameters the configured method does not take or takes only in another
    range. The learner is built at the first record, which for a service may come hours after it reported
    ready; so build it once now on a tiny input on the CPU and drop it (the backbone's feature size, which
    some ranges depend on, does not depend on the input)."""
    learner = cfg.learner
    method, hparams = learner.method, dict(learner.hparam)
    check_hparams(method, hparams)
    shape = (1,) if learner.model == "mlp" else (8, 8, 1)  # the smallest input each backbone takes
    dtype = np.dtype(np.uint8)
    try:
        check_size(learner.model, model_input_shape(shape, dtype), learner.max_parameters, width=learner.width)
    except UnsupportedInput:
        return  # a model too large for any input: every record is refused, as the first one will say
    try:
        build_learner(
            method,
            learner.model,
            shape,
            dtype,
            device=torch.device("cpu"),
            seed=learner.seed,
            buffer_size=1,  # no range depends on it: a buffer of --buffer-size would be allocated for nothing
            buffer_policy=cfg.buffer.policy,
            width=learner.width,
            hparams=hparams,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--method {method} --hparam: {err}") from err


def make_metrics(cfg: Config, device: torch.device) -> Metrics:
    """Metrics on a fresh registry, every dead-letter reason touched, the model described."""
    metrics = Metrics(
        CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS, max_class_series=cfg.metrics.max_class_series
    )
    metrics.describe(method=cfg.learner.method, model=cfg.learner.model, device=str(device))
    return metrics


def learner_factory(cfg: Config, device: torch.device) -> LearnerFactory:
    """Builds the configured learner once the first record shows the input shape and dtype; for an input
    whose backbone would pass ``max_parameters`` it raises :class:`~stream_cl.models.UnsupportedInput`."""
    learner = cfg.learner
    build = partial(
        build_learner,
        learner.method,
        learner.model,
        device=device,
        seed=learner.seed,
        buffer_size=cfg.buffer.size,
        buffer_spec=cfg.buffer.spec,
        buffer_policy=cfg.buffer.policy,
        width=learner.width,
        hparams=dict(learner.hparam),
        max_classes=learner.max_classes,
    )

    def make(shape: tuple[int, ...], dtype: np.dtype) -> Learner:
        check_size(learner.model, model_input_shape(shape, dtype), learner.max_parameters, width=learner.width)
        return build(shape, dtype)

    return make


def drift_monitor(cfg: Config, metrics: Metrics) -> DriftMonitor | None:
    if cfg.metrics.no_drift:
        return None
    try:
        return DriftMonitor(parse_drift(cfg.metrics.drift), metrics, seed=cfg.learner.seed)
    except ValueError as err:
        raise ConfigError(f"--drift: {err}") from err


def run_options(cfg: Config) -> RunOptions:
    return RunOptions(
        batch_size=cfg.run.batch_size,
        max_records=cfg.run.max_records,
        until_idle_s=cfg.source.until_idle,
        probe_every=cfg.run.probe_every,
        max_classes=cfg.learner.max_classes,
        progress=not cfg.run.no_progress and sys.stderr.isatty(),  # no carriage returns in captured logs
    )


def identity(cfg: Config) -> dict[str, object]:
    """What a checkpoint's learner must match to be restored."""
    return {"method": cfg.learner.method, "model": cfg.learner.model, "width": cfg.learner.width}


def _restore(
    cfg: Config,
    make_learner: LearnerFactory,
    probe: ProbeSet,
    accuracy: PrequentialAccuracy,
    metrics: Metrics,
    *,
    writer: bool,
) -> tuple[RunState, Restored | None, Checkpointer | None]:
    """The restored state; ``writer`` is False for the workers of a group that only read checkpoints. Those
    start with empty online accuracy windows: the checkpoint's are rank 0's, of another part of the stream."""
    if cfg.checkpoint.dir is None:
        return RunState(), None, None
    store = CheckpointStore(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, sweep=writer)
    try:
        state, restored = restore(store, make_learner, identity(cfg), probe, accuracy if writer else None)
    except UnsupportedInput as err:  # --max-parameters was lowered below the checkpoint's model
        store.close()
        raise ConfigError(
            f"the checkpoint in {cfg.checkpoint.dir} cannot be restored: {err} (--max-parameters)"
        ) from err
    except BaseException:
        store.close()
        raise
    checkpointer = Checkpointer(
        store,
        identity=identity(cfg),
        every_records=cfg.checkpoint.every_records,
        every_seconds=cfg.checkpoint.every_seconds,
        restored=restored,
        metrics=metrics,
        probe=probe,
        accuracy=accuracy,
    )
    return state, restored, checkpointer


def _check_restored(group: Group, restored: Restored | None, checkpointer: Checkpointer | None) -> None:
    """:meth:`Group.check_restored`, releasing the checkpoint directory's lock (rank 0's) if it fails."""
    try:
        group.check_restored(restored)
    except BaseException:
        if checkpointer is not None:
            checkpointer.store.close()
        raise


def _spool_dir(cfg: Config) -> Path | None:
    """Where dead letters wait for the broker: a directory that outlives the process when there is one."""
    if cfg.source.dead_letter_spool is not None:
        return Path(cfg.source.dead_letter_spool)
    if cfg.checkpoint.dir is not None:
        return Path(cfg.checkpoint.dir) / "dead-letter-spool"
    return None


def _serve_metrics(cfg: Config, metrics: Metrics, *, healthy: Check, ready: Check) -> Exporter | None:
    """``/metrics`` on the configured port; the default port moves to a free one when busy, a chosen one fails."""
    port, addr = cfg.metrics.port, cfg.metrics.addr
    if not port:
        return None
    try:
        exporter = metrics.serve(port, addr, healthy=healthy, ready=ready)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        if port != DEFAULT_METRICS_PORT or "metrics_port" in cfg.explicit:
            raise ConfigError(f"--metrics-port {port}: the port is in use on {addr}; choose another port") from None
        exporter = metrics.serve(0, addr, healthy=healthy, ready=ready)
        log.warning("port %d is in use; serving metrics on port %d instead", port, exporter.port)
    log.info("serving /metrics, /healthz, /readyz on http://%s:%d", exporter.addr, exporter.port)
    return exporter


def _delayed_labels(
    cfg: Config,
    stack: ExitStack,
    metrics: Metrics,
    restored: Restored | None,
    require_topic: bool,
    heartbeat: Heartbeat,
) -> DelayedLabels | None:
    """The label topic's source (group ``GROUP-labels``, resuming at the checkpoint's offsets), its dead-letter
    sink (``TOPIC.dlq`` through a spool of its own) and the pending store (``--pending``) as the checkpoint
    left it. While the store waits for Redis (the restore's rollback included) it beats ``heartbeat``."""
    url = cfg.labels.url
    if url is None:
        return None
    if not is_kafka_url(url):
        raise ConfigError(f"--labels {url}: label messages are read from Kafka (kafka://HOST:PORT/TOPIC)")
    source = open_source(
        url,
        group=f"{cfg.source.group}-labels",
        start_offsets=restored.offsets if restored else None,
        from_checkpoint=cfg.checkpoint.dir is not None,
        require_topic=require_topic,
        kafka_options=cfg.kafka.consumer_options(),
        kafka_client=cfg.kafka.client,
        labels=True,
    )
    stack.enter_context(source)
    spool = _spool_dir(cfg)
    sink = open_dead_letters(
        url,
        client_options=cfg.kafka.client_options(),
        spool_dir=None if spool is None else spool.with_name(spool.name + "-labels"),
    )
    store = open_pending(cfg, journal=cfg.checkpoint.dir is not None, waiting=heartbeat.waiting)
    stack.callback(store.close)
    labels = DelayedLabels(source, stack.enter_context(sink), store=store, metrics=JoinMetrics(metrics.registry))
    labels.restore(restored.pending if restored is not None else None)
    return labels


def open_pending(cfg: Config, *, journal: bool, waiting: Callable[[], None] = lambda: None) -> PendingStore:
    """The pending store ``--pending`` names, keyed under the consumer group (``journal``: the run checkpoints,
    so a Redis store keeps what a restore needs; ``waiting``: called every second while it waits for Redis)."""
    labels = cfg.labels
    max_bytes = labels.pending_max_mib * 1024 * 1024
    if labels.pending == "memory":
        return MemoryPending(ttl_s=labels.ttl_seconds, max_pending=labels.pending_max, max_bytes=max_bytes)
    return open_redis_pending(
        labels.pending,
        group=cfg.source.group,
        label_topic=KafkaUrl.parse(labels.url).topic,
        ttl_s=labels.ttl_seconds,
        max_pending=labels.pending_max,
        journal=journal,
        max_bytes=max_bytes,
        waiting=waiting,
    )


def known_lag(source: Instrumented) -> int | None:
    """The source's total lag; None while an assigned partition's is not known yet (just after a rebalance,
    before its end offset is fetched), which must not read as caught up."""
    lag = source.lag()
    if any(partition not in lag for partition in source.assignment()):
        return None
    return sum(lag.values())


def _overload(cfg: Config, source: Source, metrics: Metrics) -> OverloadPolicy | None:
    if cfg.overload.max_lag is None:
        return None
    if not isinstance(source, Instrumented):
        raise ConfigError("--max-lag needs a source that reports its lag (Kafka)")
    return OverloadPolicy(
        cfg.overload.policy,
        max_lag=cfg.overload.max_lag,
        resume_lag=cfg.overload.resume_lag,
        lag=partial(known_lag, source),
        fraction=cfg.overload.fraction,
        metrics=metrics,
        seed=cfg.learner.seed,
    )
