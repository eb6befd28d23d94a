"""The metrics port: ``/metrics`` for Prometheus plus ``/healthz`` and ``/readyz`` probes, one server.

``prometheus_client.start_http_server`` serves only metrics; a service also needs liveness and
readiness on the same port (Kubernetes probes, compose health checks), so this is a small
``http.server.ThreadingHTTPServer`` on a daemon thread that can be stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

log = logging.getLogger("monitoring.exporter")

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
"""What ``generate_latest`` writes; every Prometheus 2.x parses it (newer clients label it version=1.0.0)."""

Check = Callable[[], bool]
"""A health or readiness probe: True means healthy/ready. An exception counts as False."""


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
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        self.registry = registry
        self._exposed = WithoutCreated(registry)
        self.healthy = healthy
        self.ready = ready
        self._server = ThreadingHTTPServer((addr, port), _handler(self))
        self._server.daemon_threads = True
        self.addr, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe(check: Check) -> bool:
    try:
        return bool(check())
    except Exception:  # a probe that raises means "not ok", never a crashed server thread
        log.exception("health probe raised")
        return False


def _handler(exporter: Exporter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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
