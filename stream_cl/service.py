"""Running a configured stream to its end: ``serve`` (and ``run``, which is ``serve`` without checkpoints
and predictions), with a graceful drain on SIGTERM/SIGINT.

SIGTERM/SIGINT only set the stop flag: the loop finishes its batch, commits, writes a final
checkpoint and returns; a watchdog ends the process with exit code 3 if that takes longer than
``drain_timeout``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from stream_cl.assemble import assemble
from stream_cl.config import Config
from stream_cl.group import Group
from stream_cl.run import run_stream
from stream_cl.summary import Summary

log = logging.getLogger("stream_cl.serve")

DRAIN_EXIT_CODE = 3
"""Exit code when a drain did not finish within ``drain_timeout`` (the process is ended)."""


def serve(
    cfg: Config, stop: threading.Event | None = None, *, require_topic: bool = False, group: Group | None = None
) -> Summary:
    """Run ``cfg``'s stream until it ends (or idles out) or ``stop`` is set; returns the summary.

    ``require_topic`` makes a missing Kafka topic an error rather than a wait for its producers.
    As one worker of ``group``, the summary is the group's (see :meth:`Group.summarize`).
    """
    ready = threading.Event()
    with assemble(cfg, ready, require_topic=require_topic, group=group) as parts:
        ready.set()
        try:
            summary, state = run_stream(
                parts.source,
                parts.make_learner,
                parts.metrics,
                parts.options,
                parts.parts,
                state=parts.state,
                stop=stop,
            )
        finally:
            ready.clear()
        if group is not None:
            summary = group.summarize(summary, state.learner)
    summary.model, summary.device = cfg.learner.model, str(parts.device)
    return summary


@contextmanager
def stop_on_signals(stop: threading.Event, drain_timeout: float) -> Iterator[list[int]]:
    """Within the block, SIGTERM/SIGINT set ``stop``, and a watchdog ends the process (exit code
    :data:`DRAIN_EXIT_CODE`) if the block has not finished ``drain_timeout`` seconds later.

    Yields the list of signals received, so the caller can pick its exit code.
    """
    drained = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
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
        yield received
    finally:
        drained.set()
        stop.set()  # releases the watchdog
        for sig, handler in previous.items():
            signal.signal(sig, handler)
