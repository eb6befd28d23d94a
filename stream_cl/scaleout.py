"""Scale-out: ``serve --workers N`` starts N local workers through torch's elastic launcher, and
``torchrun ... -m stream_cl serve`` runs the very same worker on several machines.

The launcher does the coordination: rendezvous, the process group (gloo on CPU, NCCL on GPU), and
restarting the whole group (up to ``--max-restarts`` times) when a worker dies; every worker then
resumes from the newest checkpoint. Kafka's consumer group splits the partitions; the replay
buffer is shared when it is Redis. What keeps the model one is in :mod:`stream_cl.group`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, fields
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from stream_cl.config import Config
from stream_cl.errors import StreamClError
from stream_cl.summary import Summary

log = logging.getLogger("stream_cl.scaleout")

_STOPPING = "STREAM_CL_GROUP_STOPPING"
"""Set in the launcher's environment once it was told to stop: a worker started after that (a restart) starts
stopped, so a stop signal never turns into a group that learns on."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ORPHAN_MARGIN_S = 5.0
"""How much longer than ``--drain-timeout`` a worker of ``serve --workers`` outlives its launcher, at most."""


class WorkersFailed(StreamClError):
    """The group failed more often than ``--max-restarts`` allows."""

    retriable = True


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that ``torchrun`` started (it set the group's environment)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def launch(cfg: Config, log_level: str, log_format: str) -> tuple[Summary, bool]:
    """Run ``cfg.service.workers`` local workers as one group; rank 0's (the group's) summary, and
    whether a worker was stopped by a signal."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from stream_cl.assemble import check_group, check_learner, identity
    from stream_cl.checkpoint import CheckpointStore
    from stream_cl.checkpointer import latest_of

    # a usage error is no reason to start (and restart) workers
    check_group(cfg, cfg.service.workers)
    check_learner(cfg)
    if cfg.checkpoint.dir is not None:
        # Another instance on the directory, or a checkpoint that cannot be restored, fails this one at once, as
        # it fails one `serve` (exit 2), not every restarted group in turn (exit 1, retried by a supervisor).
        # Released at once: rank 0 takes the lock for the run.
        store = CheckpointStore(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, sweep=True)
        try:
            latest_of(store, identity(cfg))
        finally:
            store.close()
    # SIGTERM and SIGINT are this process's to forward (see _forward_stop_signals)
    settable = "signals_to_handle" in {field.name for field in fields(LaunchConfig)}
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.service.workers,
        run_id=f"stream-cl-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # the agent binds a free port itself: none is picked and freed first
        max_restarts=cfg.service.max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
        **({"signals_to_handle": "SIGHUP,SIGQUIT"} if settable else {}),
    )
    log.info("starting %d workers (restarts allowed: %d)", cfg.service.workers, cfg.service.max_restarts)
    with _forward_stop_signals(agent_handles_them=not settable) as stopped:
        try:
            results = elastic_launch(config, _spawned)(cfg, log_level, log_format)
        except ChildFailedError as err:
            message = err.get_first_failure()[1].message
            message = message.get("message", message) if isinstance(message, dict) else message
            if stopped:
                _drain_failed(f"the group failed while draining ({message})")
            raise WorkersFailed(f"the group of workers failed: {message}") from None
    returned = {rank: json.loads(value) for rank, value in results.items()}  # keyed by rank, in finishing order
    if None in returned.values():
        _drain_failed("the group failed while draining and was restarted; the restarted workers started stopped")
    summary, received = returned[0]
    return Summary(**summary), received or bool(stopped)


def _drain_failed(what: str) -> NoReturn:
    """End the launcher as one process ends a drain that failed: exit code DRAIN_EXIT_CODE, no summary (what
    rank 0 of a restarted group would return covers none of the run's records)."""
    from stream_cl.service import DRAIN_EXIT_CODE

    log.error("stopping: %s; exiting with code %d and no summary", what, DRAIN_EXIT_CODE)
    raise SystemExit(DRAIN_EXIT_CODE)


@contextmanager
def _forward_stop_signals(*, agent_handles_them: bool = False) -> Iterator[list[int]]:
    """Within the block, SIGTERM/SIGINT to the launcher go on to its workers (the processes started within
    the block: the elastic agent's), which drain and stop together and return the group's summary; yields
    the signals received.

    The elastic agent's own handling would send the workers SIGTERM and kill them 30 s later without ever
    reading what they return, while the launcher dies with a traceback: no summary, exit code 1, and a drain
    cut short whatever ``--drain-timeout`` says. So the agent is told to handle only SIGHUP and SIGQUIT, or,
    where it has no such setting (``agent_handles_them``), the handler it installs forwards (see
    :func:`_agent_forwards`).
    """
    received: list[int] = []
    others = set(multiprocessing.active_children())  # not the launcher's: started before it

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        os.environ[_STOPPING] = "1"  # workers the agent starts from now on (a restart) start stopped
        for worker in set(multiprocessing.active_children()) - others:  # the agent's: this process's children
            with suppress(ProcessLookupError):  # exited meanwhile
                os.kill(worker.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in _STOP_SIGNALS}
    try:
        with _agent_forwards(forward) if agent_handles_them else nullcontext():
            yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.environ.pop(_STOPPING, None)


@contextmanager
def _agent_forwards(forward: Callable[[int, object], None]) -> Iterator[None]:
    """Within the block, the signal handler torch's agent installs forwards SIGTERM/SIGINT with ``forward``.

    Torch without ``LaunchConfig.signals_to_handle`` installs its handler for SIGTERM, SIGINT, SIGHUP and
    SIGQUIT each time it starts the workers (``PContext.start``), after ours, looking it up by name in its
    module: that name is given a handler that forwards the stop signals and leaves the others to torch's.
    """
    from torch.distributed.elastic.multiprocessing import api

    torchs = getattr(api, "_terminate_process_handler", None)
    if torchs is None:
        log.warning(
            "this torch's launcher takes SIGTERM/SIGINT itself: a stop signal ends the workers within 30 s, "
            "without the group's summary (a torch whose LaunchConfig has signals_to_handle lets them drain)"
        )
        yield
        return

    def handler(signum: int, frame: object) -> None:
        (forward if signum in _STOP_SIGNALS else torchs)(signum, frame)

    api._terminate_process_handler = handler
    try:
        yield
    finally:
        api._terminate_process_handler = torchs


def _spawned(cfg: Config, log_level: str, log_format: str) -> str:
    """A worker process the launcher started: rank 0 returns the group's summary as JSON (``null`` from a
    worker started after the stop signal)."""
    from stream_cl.logs import configure
    from stream_cl.service import DRAIN_EXIT_CODE

    configure(log_level, log_format)
    if os.environ.get(_STOPPING):  # restarted after the launcher was told to stop: the drain failed
        log.error("worker restarted after the stop signal: not starting (no broker, buffer or checkpoint)")
        return json.dumps(None)
    launcher = os.getppid()
    # torch's SIGINT on the launcher's death starts a drain, but only once the main thread runs Python again: one
    # blocked in a collective or a call to the launcher's store would outlive it, holding partitions and the lock
    _exit_when_orphaned(launcher, after_s=cfg.service.drain_timeout + ORPHAN_MARGIN_S, code=DRAIN_EXIT_CODE)
    summary, received = run_worker(cfg)
    if os.getppid() != launcher:  # killed: torch would wait forever for it to read what this returns
        log.info("drained after the launcher (pid %d) was gone; exiting", launcher)
        logging.shutdown()
        os._exit(0)
    return json.dumps([asdict(summary), received])


def run_worker(cfg: Config, torchrun: int | None = None) -> tuple[Summary, bool]:
    """Join the group the launcher described in the environment, learn, and leave it. ``torchrun``: the pid of
    the ``torchrun`` that started this worker, which it outlives by at most a second."""
    if torchrun is not None:
        _exit_when_orphaned(torchrun)
    import torch
    import torch.distributed as dist

    from stream_cl.group import Group, process_group
    from stream_cl.service import serve, stop_on_signals

    nccl = torch.cuda.is_available() and cfg.learner.device != "cpu"
    if nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _store(rank, world_size)
    timeout = timedelta(seconds=cfg.service.collective_timeout)  # the backends' own: 10 (NCCL) to 30 minutes
    with process_group("nccl" if nccl else "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout):
        offsets = StoreRunOffsets(store)
        group = Group.current(sync=cfg.service.sync, average_every=cfg.service.average_every, run_offsets=offsets)
        how = "all-reduce" if group.sync == "allreduce" else f"average every {group.average_every}"
        log.info("worker %d of %d (%s), %s, pid %d", group.rank, group.world_size, dist.get_backend(), how, os.getpid())
        stop = threading.Event()
        with stop_on_signals(stop, cfg.service.drain_timeout) as received:
            summary = serve(for_rank(cfg, group.rank, group.world_size), stop, group=group)
        return summary, bool(received)


def _exit_when_orphaned(parent: int, interval_s: float = 1.0, after_s: float = 0.0, code: int = 1) -> None:
    """Exit (``code``) ``after_s`` seconds after the ``parent`` that started this worker is gone.

    torchrun starts its workers in sessions of their own and signals none when it dies, and a worker learning on
    unsupervised would hold its partitions: it exits at once (code 1). The group's other workers then fail their
    next collective; their ``torchrun`` restarts them and waits for this machine's to rejoin (its supervisor
    restarts it), and the group resumes from the checkpoint. The workers of ``serve --workers`` get SIGINT from
    torch when their launcher dies, and drain: this bounds that drain."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        if after_s:
            time.sleep(after_s)
        log.error("the process that started this worker (pid %d) is gone: exiting with code %d", parent, code)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _store(rank: int, world_size: int) -> object:
    """The launcher's key-value store, under a prefix of this round of the group: a restarted group must not
    read the addresses its dead predecessor left there (its workers would connect to ports nobody listens on)."""
    import torch.distributed as dist

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
    timeout = timedelta(seconds=300)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=not agent_store and rank == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"stream-cl/round-{_round(store, rank, world_size, timeout)}", store)


def _round(store: object, rank: int, world_size: int, timeout: timedelta) -> str:
    """A name for this round of the group that every worker learns from rank 0. Not the restart count
    torch gives each worker: every machine's agent counts its own (one restarting its workers because
    another machine's failed does not count it; one a supervisor restarted counts from 0). Each worker
    asks under a nonce of its own, so an answer or question a dead round left in the store is never
    taken for this round's."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"stream-cl/ask/{rank}", nonce)
        name = store.get(f"stream-cl/answer/{nonce}").decode()  # waits up to the store's timeout
        store.set(f"stream-cl/joined/{name}/{rank}", "")
        return name
    name = uuid.uuid4().hex
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world_size))
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        for peer in sorted(waiting):
            if store.check([f"stream-cl/joined/{name}/{peer}"]):
                waiting.discard(peer)
            elif store.check([f"stream-cl/ask/{peer}"]) and (
                nonce := store.get(f"stream-cl/ask/{peer}")
            ) != answered.get(peer):
                store.set(f"stream-cl/answer/{nonce.decode()}", name)  # a dead round's question too: nobody waits
                answered[peer] = nonce
        if not waiting:
            return name
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"workers {sorted(waiting)} did not join the group within {timeout.total_seconds():.0f} s"
            )
        time.sleep(0.02)


class StoreRunOffsets:
    """The run's :class:`consumers.kafka.RunOffsets` in a ``torch.distributed`` key-value store (the
    launcher's, under this round's prefix: a restarted group starts from the checkpoint again)."""

    def __init__(self, store: object) -> None:
        import torch.distributed as dist

        self._store = dist.PrefixStore("run-offsets", store)

    def get(self, key: tuple[str, int]) -> tuple[int, int] | None:
        name = _offset_name(key)
        if not self._store.check([name]):
            return None
        offset, within = json.loads(self._store.get(name))
        if not (isinstance(offset, int) and isinstance(within, int) and offset >= 0 and within >= 0):
            raise ValueError(f"not an (offset, within) pair: {offset!r}, {within!r}")
        return offset, within

    def put(self, key: tuple[str, int], offset: int, within: int) -> None:
        """Only ever forward: a worker evicted mid-step may commit after the partition's next owner got further."""
        name, wanted = _offset_name(key), json.dumps([offset, within])
        expected = ""  # compare_set sets a missing key when the expected value is empty
        while True:
            current = self._store.compare_set(name, expected, wanted).decode()
            if current == wanted or tuple(json.loads(current)) >= (offset, within):
                return
            expected = current


def _offset_name(key: tuple[str, int]) -> str:
    topic, partition = key
    return f"{topic}/{partition}"


def for_rank(cfg: Config, rank: int, world_size: int) -> Config:
    """Worker ``rank``'s settings: its own metrics port (``--metrics-port`` + rank), its own
    predictions file, dead-letter file and dead-letter spool (``.rank`` inserted before the suffix; directories
    get ``-rank``)."""
    if world_size == 1:
        return cfg
    values: dict[str, object] = {}
    if cfg.metrics.port:
        values["metrics_port"] = cfg.metrics.port + rank
    url = cfg.predictions.url
    if url is not None and "://" not in url:
        values["predictions"] = _ranked(url, rank)
    if cfg.source.dead_letter_out is not None:  # one writer per file: appends of two would interleave
        values["dead_letter_out"] = _ranked(cfg.source.dead_letter_out, rank)
    spool = cfg.source.dead_letter_spool
    if spool is None and cfg.checkpoint.dir is not None:
        spool = str(Path(cfg.checkpoint.dir) / "dead-letter-spool")
    if spool is not None:
        values["dead_letter_spool"] = f"{spool}-{rank}"
    return cfg.with_values(**values) if values else cfg


def _ranked(file: str, rank: int) -> str:
    """``file`` with ``.rank`` inserted before its suffix: ``out.jsonl`` -> ``out.1.jsonl``."""
    path = Path(file)
    return str(path.with_name(f"{path.stem}.{rank}{path.suffix}"))
