"""A Redis outage of the delayed-label pending store pauses the service, it does not stall it: ``/readyz`` answers
503, while ``/healthz`` stays 200 past ``--stall-seconds`` (a liveness probe must not restart a learner that waits
on purpose) and the gauges keep telling the truth (the consumer lag grows with what arrives meanwhile).
Real broker and redis-server, the service in this process."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from consumers.label_wire import encode_label
from stream_cl.config import load
from stream_cl.service import serve
from tests.fixtures.procs import free_port
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_delayed_labels_kafka import produce_features, produce_labels
from tests.streams import blob_arrays

STALL_AFTER_S = 5.0  # the wait beats every second: room for a loaded machine's late beats


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError:  # not serving yet
        return 0


def sample(port: int, name: str, labels: dict[str, str]) -> float | None:
    """One sample of ``/metrics`` (None: no such series)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def wait_until(check: Callable[[], bool], service: threading.Thread, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert service.is_alive(), "serve ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_pending_store_outage_keeps_the_service_live_and_its_gauges_current(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, redis_aof: RedisServer
) -> None:
    features, labels = make_topic(1), make_topic(1)
    n = 200
    x, y = blob_arrays(n_classes=2, per_class=n // 2, seed=3)
    produce_features(kafka_bootstrap, features, range(n // 2), x)
    produce_labels(kafka_bootstrap, labels, [(i + 0.5, encode_label(f"f{i}", f"c{y[i]}")) for i in range(n)])
    port = free_port()
    flags = {"model": "mlp", "width": 16, "no_drift": True, "probe_fraction": 0.0, "no_progress": True}
    flags |= {"source": f"kafka://{kafka_bootstrap}/{features}", "group": f"g-{features}", "batch_size": 10}
    flags |= {"labels": f"kafka://{kafka_bootstrap}/{labels}", "pending": redis_aof.url}
    flags |= {"metrics_port": port, "stall_seconds": STALL_AFTER_S, "kafka_session_timeout_ms": 2000}
    flags |= {"dead_letter_spool": str(tmp_path / "spool")}
    stop = threading.Event()
    service = threading.Thread(target=serve, args=(load(flags, {}), stop), daemon=True)
    service.start()
    lag = lambda: sample(port, "streamcl_consumer_lag", {"topic": features, "partition": "0"})  # noqa: E731
    joined = lambda: sample(port, "streamcl_labels_total", {"outcome": "joined"}) or 0  # noqa: E731
    try:
        wait_until(lambda: status(port, "/readyz") == 200 and joined() == n // 2, service)

        redis_aof.kill()
        produce_features(kafka_bootstrap, features, range(n // 2, 3 * n // 4), x)  # the loop waits on their batch
        wait_until(lambda: status(port, "/readyz") == 503, service)
        produce_features(kafka_bootstrap, features, range(3 * n // 4, n), x)  # arrive while the loop waits
        # at most one batch past n // 2 was handed to the learner: a lag published during the wait is at least
        # n // 2 - 10; one published before it (end offset 3n/4 at most) is at most n // 4
        wait_until(lambda: (lag() or 0) >= n // 2 - 10, service, timeout_s=30)
        past_stall = time.monotonic() + STALL_AFTER_S + 2
        while time.monotonic() < past_stall:
            assert (status(port, "/healthz"), status(port, "/readyz")) == (200, 503), "paused, not stuck"
            time.sleep(0.5)

        redis_aof.start()
        wait_until(lambda: joined() == n and status(port, "/readyz") == 200 and lag() == 0, service)
    finally:
        if redis_aof.proc.poll() is not None:  # a stop during an outage waits for Redis
            redis_aof.start()
        stop.set()
        service.join(60)
    assert not service.is_alive()
