"""The metrics port under idle, slow and too many clients: connections are bounded in number and in time, so
they can hold neither threads nor file descriptors for long, and scrapes go on."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
from prometheus_client import CollectorRegistry

from monitoring.exporter import Exporter
from tests.monitoring.test_exporter import get

TIMEOUT_S = 0.5


@pytest.fixture
def connections() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def connect(exporter: Exporter, stack: ExitStack) -> socket.socket:
    """A client connection that sends nothing (waits at most 5 s for the server)."""
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", exporter.port)))
    sock.settimeout(5)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (end of file or reset); False if it is still open after 5 s."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_are_closed_after_the_timeout_and_scrapes_go_on(connections: ExitStack) -> None:
    with Exporter(CollectorRegistry(), 0, timeout_s=TIMEOUT_S, max_connections=8) as exporter:
        idle = [connect(exporter, connections) for _ in range(4)]
        started = time.monotonic()
        assert get(exporter, "/healthz")[0] == 200
        assert all(closed_by_server(sock) for sock in idle)
        assert time.monotonic() - started < TIMEOUT_S + 2


def test_a_client_sending_one_byte_at_a_time_is_cut_at_the_deadline(connections: ExitStack) -> None:
    with Exporter(CollectorRegistry(), 0, timeout_s=TIMEOUT_S) as exporter:
        slow = connect(exporter, connections)
        slow.settimeout(TIMEOUT_S / 5)  # each byte well within the per-read timeout
        started = time.monotonic()
        with pytest.raises(OSError):  # reset or broken pipe once the server has shut the connection
            while time.monotonic() - started < 5:
                slow.send(b"X")  # a request line that never ends
                try:
                    if slow.recv(1) == b"":
                        raise ConnectionResetError("closed by the server")
                except TimeoutError:
                    pass
        assert time.monotonic() - started < TIMEOUT_S + 2


def test_a_new_connection_takes_the_slot_of_the_oldest_idle_one(connections: ExitStack) -> None:
    """Clients that connect and send nothing, reconnecting before the timeout, would otherwise keep every
    probe and scrape out: liveness probes would fail and restart a healthy learner."""
    with Exporter(CollectorRegistry(), 0, timeout_s=30, max_connections=4) as exporter:
        idle = [connect(exporter, connections) for _ in range(4)]
        time.sleep(0.2)  # accepted and holding every slot
        assert get(exporter, "/healthz")[0] == 200  # far within the 30 s timeout
        assert closed_by_server(idle[0])  # the oldest gave its slot
        before = len(os.listdir("/proc/self/fd"))
        more = [connect(exporter, connections) for _ in range(20)]
        assert all(closed_by_server(sock) for sock in idle[1:] + more[:-4])  # at once, the newest 4 kept
        # the clients' own descriptors and the server's one more kept connection (4 now, 3 before): the
        # server keeps none of the connections it gave up open once their threads have closed them
        deadline = time.monotonic() + 5
        while len(os.listdir("/proc/self/fd")) > before + len(more) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) <= before + len(more) + 1
        assert get(exporter, "/metrics")[0] == 200


def test_connections_beyond_the_cap_are_closed_at_once_while_every_slot_is_answering(connections: ExitStack) -> None:
    answer = threading.Event()
    probing = threading.Semaphore(0)

    def slow_probe() -> bool:
        probing.release()
        return answer.wait(10)

    with Exporter(CollectorRegistry(), 0, timeout_s=30, max_connections=2, healthy=slow_probe) as exporter:
        with ThreadPoolExecutor(2) as pool:
            answering = [pool.submit(get, exporter, "/healthz") for _ in range(2)]
            assert probing.acquire(timeout=5) and probing.acquire(timeout=5)  # both requests are being answered
            refused = [connect(exporter, connections) for _ in range(5)]
            assert all(closed_by_server(sock) for sock in refused)  # no answer in progress is cut for them
            answer.set()
            assert [f.result()[0] for f in answering] == [200, 200]
        deadline = time.monotonic() + 5  # the slots are free once the server has seen the closes
        while get_or_none(exporter) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get_or_none(exporter) == 200


def get_or_none(exporter: Exporter) -> int | None:
    try:
        return get(exporter, "/healthz")[0]
    except OSError:  # refused while the slots were still taken
        return None


def test_stop_does_not_wait_for_an_idle_client(connections: ExitStack) -> None:
    exporter = Exporter(CollectorRegistry(), 0, timeout_s=30)
    idle = connect(exporter, connections)
    time.sleep(0.2)
    started = time.monotonic()
    exporter.stop()
    assert time.monotonic() - started < 5 and closed_by_server(idle)


@pytest.mark.parametrize("timeout_s, max_connections", [(0, 4), (1.0, 0)])
def test_bad_limits(timeout_s: float, max_connections: int) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        Exporter(CollectorRegistry(), 0, timeout_s=timeout_s, max_connections=max_connections)
