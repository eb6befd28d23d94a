"""What the per-second gauges carry: the replay buffer's errors reach ``/metrics`` within a second, not at the next
probe evaluation, and a still-owned partition's ``streamcl_consumer_lag`` series is never missing from a scrape."""

from __future__ import annotations

import time
from functools import partial
from types import SimpleNamespace

import redis
import torch
from prometheus_client import CollectorRegistry

from buffers.open import redis_client
from buffers.redis import RedisStore
from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from stream_cl.build import build_learner
from stream_cl.labels import LabelTree
from stream_cl.publishing import GAUGE_INTERVAL_S, Publisher
from stream_cl.run import RunOptions, run_stream
from tests.fixtures.redis import RedisServer
from tests.streams import FaultAhead, write_stream


class OutageThenPause(FaultAhead):
    """Kills Redis ahead of the records from ``kill_at`` on, pauses a gauge interval ahead of those from ``pause_at``
    on (a slow stream), and reads what ``/metrics`` says about the buffer ahead of those from ``read_at`` on."""

    def __init__(self, source: RecordedSource, server: RedisServer, registry: CollectorRegistry) -> None:
        super().__init__(source)
        self.server, self.registry = server, registry
        self.kill_at, self.pause_at, self.read_at = 30, 40, 50
        self.exported: tuple[float | None, float | None] | None = None  # (errors, bytes) as read at read_at

    def before_poll(self) -> None:
        if self.polled == self.kill_at:
            self.server.kill()
        if self.polled == self.pause_at:
            time.sleep(GAUGE_INTERVAL_S + 0.1)
        if self.polled == self.read_at:
            value = self.registry.get_sample_value
            self.exported = (value("streamcl_buffer_errors_total"), value("streamcl_buffer_bytes"))


def test_a_redis_error_is_exported_within_a_second_without_a_probe_evaluation(redis_aof, tmp_path) -> None:
    """At 1 record/s the default probe cadence (500 records) exported a Redis error minutes late, and an error just
    before the stream went quiet never, so the buffer-errors alert stayed silent."""
    path = write_stream(tmp_path / "blobs.rec.gz", n_classes=3, per_class=20, shape=(8,))
    store = RedisStore(redis_client(redis_aof.url), 50, name="cadence", fallback_capacity=20, retry_min_s=0)
    registry = CollectorRegistry()
    source = OutageThenPause(RecordedSource(path), redis_aof, registry)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), buffer=store)
    options = RunOptions(batch_size=10, progress=False, probe_every=10**6)
    summary, _ = run_stream(source, make, Metrics(registry), options)

    assert summary.learned == 60
    local = store.fallback.stats()
    assert local.size == 20, "the two batches learned while Redis was down went to the local fallback"
    assert source.exported == (2, local.nbytes), "both failed steps and the fallback's bytes, with no probe due"
    # at the end every failure: the three steps', and the final read of the class counts
    assert registry.get_sample_value("streamcl_buffer_errors_total") == store.stats().errors == 4


def commands_served(client: redis.Redis) -> dict[str, int]:
    """Calls per command the server has run, other than the INFO asking."""
    return {name: s["calls"] for name, s in client.info("commandstats").items() if name != "cmdstat_info"}


def test_the_per_second_gauges_ask_redis_nothing(redis_server) -> None:
    """The buffer's figures come from the replies its learning steps already got: publishing them every second
    costs no round trip (the class counts, which do, wait for the probe cadence)."""
    store = RedisStore(redis_client(redis_server.url), 50, name="cadence-calls")
    store.clear()
    store.add(torch.zeros(5, 8), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(metrics)
    learner = SimpleNamespace(buffer=store, labels=LabelTree())
    asking = redis_server.client()
    before = commands_served(asking)
    for _ in range(3):
        publisher.gauges(time.monotonic(), learner, PrequentialAccuracy(), source=None)
    assert commands_served(asking) == before
    assert metrics.registry.get_sample_value("streamcl_buffer_bytes") == store.stats().nbytes > 0


class ScrapedWhileLagIsRead:
    """A Kafka source's lag, read while a scrape of ``registry`` comes in (a real source reads it under a lock, which
    leaves the exporter's thread time to scrape): what that scrape sees of ``streamcl_consumer_lag``."""

    assigned_at = None

    def __init__(self, registry: CollectorRegistry, lags: dict[tuple[str, int], int]) -> None:
        self.registry, self.lags = registry, lags
        self.scraped: list[set[tuple[str, str]]] = []

    def lag(self) -> dict[tuple[str, int], int]:
        self.scraped.append(lag_series(self.registry))
        return dict(self.lags)

    def assignment(self) -> set[tuple[str, int]]:
        return set(self.lags)

    def take_decode_seconds(self) -> list[float]:
        return []


def lag_series(registry: CollectorRegistry) -> set[tuple[str, str]]:
    return {
        (s.labels["topic"], s.labels["partition"])
        for family in registry.collect()
        if family.name == "streamcl_consumer_lag"
        for s in family.samples
    }


def test_a_scrape_while_the_lag_is_republished_finds_every_owned_partition() -> None:
    """The gauge was emptied before the lag was read again: a scrape in between found no series, which Prometheus
    marks stale, resetting the ``for:`` of the lag alerts."""
    metrics = Metrics(CollectorRegistry())
    source = ScrapedWhileLagIsRead(metrics.registry, {("samples", 0): 3, ("samples", 1): 4})
    publisher = Publisher(metrics)
    for _ in range(3):
        publisher.gauges(time.monotonic(), None, PrequentialAccuracy(), source)
    assert source.scraped[1:] == [{("samples", "0"), ("samples", "1")}] * 2


def test_a_partition_no_longer_owned_loses_its_series() -> None:
    metrics = Metrics(CollectorRegistry())
    source = ScrapedWhileLagIsRead(metrics.registry, {("samples", 0): 3, ("samples", 1): 4})
    publisher = Publisher(metrics)
    publisher.gauges(time.monotonic(), None, PrequentialAccuracy(), source)
    source.lags = {("samples", 1): 5}  # a rebalance gave partition 0 to another worker
    publisher.gauges(time.monotonic(), None, PrequentialAccuracy(), source)
    assert lag_series(metrics.registry) == {("samples", "1")}
    assert metrics.registry.get_sample_value("streamcl_consumer_lag", {"topic": "samples", "partition": "1"}) == 5
