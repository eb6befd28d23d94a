"""The metrics port: ``/metrics`` for Prometheus plus ``/healthz`` and ``/readyz`` probes, one server.

``prometheus_client.start_http_server`` serves only metrics; a service also needs liveness and
readiness on the same port (Kubernetes probes, compose health checks), so this is a small
``http.server.ThreadingHTTPServer`` on a daemon thread that can be stopped. Its connections are
bounded in number and in time (:class:`_BoundedServer`): a client that connects and sends nothing,
or one byte at a time, must not hold threads and file descriptors the learner needs, nor keep probes and
scrapes out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

log = logging.getLogger("monitoring.exporter")

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
"""What ``generate_latest`` writes; every Prometheus 2.x parses it (newer clients label it version=1.0.0)."""

Check = Callable[[], bool]
"""A health or readiness probe: True means healthy/ready. An exception counts as False."""

REQUEST_TIMEOUT_S = 10.0
"""Longest one connection may take, all reads and writes together; a scrape or probe takes milliseconds."""

MAX_CONNECTIONS = 16
"""Connections served at once. Scrapers and probes rarely hold more than a few; when all are taken, a new one
takes the slot of the oldest that has not sent its whole request yet, else it is closed at once."""

ACCEPT_BACKOFF_S = 0.1
"""Pause after a failed ``accept`` (no file descriptor left): the listening socket stays readable, so
without a pause the server thread would spin on it."""


def _always() -> bool:
    return True


class WithoutCreated:
    """A registry's metrics minus the ``*_created`` samples of counters and histograms.

    Those are creation timestamps, one extra series per counter child that no dashboard or alert
    reads. prometheus_client can only drop them process-wide (``disable_created_metrics``), which
    would change every other registry in the process too; filtering here keeps it to this port.

    Examples
    --------
    >>> from prometheus_client import Counter
    >>> registry = CollectorRegistry()
    >>> Counter("jobs", "Jobs done.", registry=registry).inc()
    >>> b"jobs_created" in generate_latest(WithoutCreated(registry)), b"jobs_created" in generate_latest(registry)
    (False, True)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():  # fresh Metric objects on every collect, safe to trim
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


class Exporter:
    """Serve a registry's metrics and two probes on ``addr:port`` until :meth:`stop`.

    ``GET /metrics`` answers the Prometheus text format (without ``*_created`` series, see
    :class:`WithoutCreated`); ``GET /healthz`` and ``GET /readyz`` answer ``200 ok`` when
    ``healthy()`` / ``ready()`` return True and ``503`` otherwise.
    The service (``stream-cl serve``) passes e.g. ``ready=lambda: consumer_assigned`` and
    ``healthy=lambda: loop_alive``; the defaults always answer 200.
    At most ``max_connections`` connections are served at once, each for at most ``timeout_s``; when all
    are taken, a new connection takes the slot of the oldest one still sending its request (else it is
    closed on arrival), so clients that connect and send nothing cannot keep probes and scrapes out.

    Parameters
    ----------
    registry
        The registry to expose (``Metrics.registry``).
    port
        TCP port; 0 picks a free one (read it back from :attr:`port`).
    addr
        Bind address (``0.0.0.0`` inside a container).
    healthy, ready
        Liveness and readiness callables, called on every probe request (keep them cheap).
    timeout_s
        Longest one connection is served, all reads and writes together; then it is closed.
    max_connections
        Connections served at once.

    Examples
    --------
    >>> exporter = Exporter(CollectorRegistry(), 0, ready=lambda: False)
    >>> exporter.port > 0
    True
    >>> exporter.stop()
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        port: int,
        addr: str = "127.0.0.1",
        *,
        healthy: Check = _always,
        ready: Check = _always,
        timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        if timeout_s <= 0 or max_connections < 1:
            raise ValueError(f"need timeout_s > 0 and max_connections >= 1, got {timeout_s}, {max_connections}")
        self.registry = registry
        self._exposed = WithoutCreated(registry)
        self.healthy = healthy
        self.ready = ready
        self._server = _BoundedServer((addr, port), _handler(self, timeout_s), timeout_s, max_connections)
        self.addr, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.cut()  # a slow client must not hold up the join of its thread in server_close
        self._server.server_close()

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, for at most ``max_connections`` connections at once and ``timeout_s`` each.

    The handler's socket timeout bounds each read and write; a deadline per connection, checked by the
    serving thread at least every half second (``serve_forever``'s poll), bounds a client that keeps each
    read just under the timeout.
    """

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], timeout_s: float, max_connections: int
    ) -> None:
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self._deadlines: dict[socket.socket, float] = {}  # connection being served → when it is cut
        self._requesting: set[socket.socket] = set()  # those that have not sent a whole request yet
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        try:
            return super().get_request()
        except OSError:  # e.g. EMFILE; socketserver skips the connection
            time.sleep(ACCEPT_BACKOFF_S)
            raise

    def verify_request(self, request: socket.socket, client_address: object) -> bool:
        """Take the connection if a slot is free, or the slot of the oldest connection still sending its
        request (a probe or scrape sends its request at once); socketserver closes it at once otherwise."""
        with self._lock:
            if len(self._deadlines) >= self.max_connections:
                if not self._requesting:
                    log.debug("closing a connection from %s: %d being answered", client_address, len(self._deadlines))
                    return False
                oldest = min(self._requesting, key=self._deadlines.__getitem__)
                self._forget(oldest)  # its thread closes it; untracked now, cut() never touches it again
                with contextlib.suppress(OSError):  # the client went away meanwhile
                    oldest.shutdown(socket.SHUT_RDWR)
            self._deadlines[request] = time.monotonic() + self.timeout_s
            self._requesting.add(request)
            return True

    def requested(self, request: socket.socket) -> None:
        """``request`` has sent its whole request: its slot is no longer given to newcomers."""
        with self._lock:
            self._requesting.discard(request)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._lock:  # untracked before it is closed: cut() never touches a closed (reused) descriptor
            self._forget(request)
        super().shutdown_request(request)

    def _forget(self, request: socket.socket) -> None:
        self._deadlines.pop(request, None)
        self._requesting.discard(request)

    def service_actions(self) -> None:
        self.cut(time.monotonic())

    def cut(self, now: float = math.inf) -> None:
        """Shut down the connections whose deadline is past ``now`` (all by default); their threads then end."""
        with self._lock:
            for request, deadline in self._deadlines.items():
                if deadline <= now:
                    with contextlib.suppress(OSError):  # the client went away meanwhile
                        request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: socket.socket, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # a client gone, or cut at its deadline, mid-answer
            log.debug("connection from %s ended early", client_address, exc_info=True)
        else:
            log.exception("error answering %s", client_address)


def _probe(check: Check) -> bool:
    try:
        return bool(check())
    except Exception:  # a probe that raises means "not ok", never a crashed server thread
        log.exception("health probe raised")
        return False


def _handler(exporter: Exporter, timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # per read and write of the connection's socket (socketserver sets it in setup)

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # the request line and every header read
            self.server.requested(self.connection)
            return parsed

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(exporter._exposed), TEXT_FORMAT)
            elif path in ("/healthz", "/readyz"):
                ok = _probe(exporter.healthy if path == "/healthz" else exporter.ready)
                self._answer(200 if ok else 503, b"ok\n" if ok else b"unavailable\n", "text/plain; charset=utf-8")
            else:
                self._answer(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes every second would flood stderr
            pass

    return Handler
