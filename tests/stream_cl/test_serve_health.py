"""``/healthz`` follows the learning loop, not only the HTTP thread: a loop stuck in a batch answers 503 and
reports no throughput, while a loop idle-polling a quiet stream stays healthy."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumers.record import Poll
from monitoring.metrics import Metrics
from stream_cl.config import load
from stream_cl.run import RunOptions, RunParts, run_stream
from stream_cl.service import serve
from tests.streams import write_stream

STALL_AFTER_S = 1.5


class StuckSink:
    """A predictions output that takes ``delay`` per record and, once ``stick`` is set, blocks until released
    (like a FIFO nobody reads): the loop stays inside one batch."""

    def __init__(self, delay: float) -> None:
        self.delay, self.sent = delay, 0
        self.stick, self.blocked, self.release = threading.Event(), threading.Event(), threading.Event()

    def send(self, key: bytes, value: bytes, acknowledged: Callable[..., None], lost: Callable) -> None:
        if self.stick.is_set():
            self.blocked.set()
            self.release.wait()
        time.sleep(self.delay)
        self.sent += 1
        acknowledged()

    def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def samples_per_second(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        body = answer.read().decode()
    return float(re.search(r"^streamcl_samples_per_second (\S+)$", body, re.MULTILINE).group(1))


def wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_stuck_loop_fails_the_probes_and_reports_no_throughput(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = StuckSink(delay=0.004)
    monkeypatch.setattr("stream_cl.assemble.open_sink", lambda url, **_: sink)
    port = free_port()
    flags = {"model": "mlp", "width": 16, "no_drift": True, "probe_fraction": 0.0, "no_progress": True}
    # long enough (16 s of sends) to still be learning, however slowly the probes answer, when the sink sticks
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=4, per_class=1000)
    cfg = load(
        {**flags, "source": str(stream), "metrics_port": port, "predictions": "stuck", "predictions_for": "all"}
        | {"stall_seconds": STALL_AFTER_S},
        {},
    )
    stop = threading.Event()
    service = threading.Thread(target=serve, args=(cfg, stop), daemon=True)
    service.start()
    try:
        wait_until(lambda: sink.sent >= 300)  # over a second of learning, so a rate has been published
        assert (status(port, "/healthz"), status(port, "/readyz")) == (200, 200)
        assert samples_per_second(port) > 0
        sink.stick.set()
        assert sink.blocked.wait(60)
        time.sleep(STALL_AFTER_S + 1)  # and over two gauge intervals since the last one was published
        assert (status(port, "/healthz"), status(port, "/readyz")) == (503, 503)
        assert samples_per_second(port) == 0
    finally:
        stop.set()
        sink.release.set()
        service.join(60)
    assert not service.is_alive()


class Quiet:
    """A stream on which nothing arrives: every poll waits its timeout and returns nothing."""

    poll_timeout_s, fetches_ahead, exhausted = 0.05, False, False

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        time.sleep(timeout_s)
        return Poll()

    def commit(self, offsets: dict) -> None:
        pass


def test_an_idle_loop_keeps_beating() -> None:
    metrics = Metrics(CollectorRegistry())
    parts, stop = RunParts(), threading.Event()
    beat = parts.heartbeat

    def never(*_: object) -> None:
        raise AssertionError("no record, no learner")

    options = RunOptions(progress=False)
    loop = threading.Thread(target=run_stream, args=(Quiet(), never, metrics, options, parts), kwargs={"stop": stop})
    loop.start()
    try:
        beats = set()  # each turn waits a 0.05 s poll: ~30 beats in the 1.5 s watched, unless the loop stalls
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            assert beat.alive(2.0)  # a quiet stream is no stuck loop, however long it stays quiet
            beats.add(beat.last)
            time.sleep(0.05)
        assert len(beats) > 5  # the start-up beat and at least 5 turns after it
        assert metrics.registry.get_sample_value("streamcl_samples_per_second") == 0
    finally:
        stop.set()
        loop.join(10)
