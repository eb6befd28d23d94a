"""An ER learner on a shared Redis buffer keeps learning while Redis is down, then picks the buffer up again."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from buffers.open import redis_client
from buffers.redis import RedisStore
from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, run_stream
from tests.streams import FaultAhead, write_stream


class Outage(FaultAhead):
    """A source that kills Redis after ``kill_at`` polled records and starts it again at ``start_at``."""

    def __init__(self, source: RecordedSource, server, store: RedisStore, kill_at: int, start_at: int) -> None:
        super().__init__(source)
        self.server, self.store = server, store
        self.kill_at, self.start_at = kill_at, start_at
        self.seen_at_kill = None

    def before_poll(self) -> None:
        if self.polled >= self.kill_at and self.seen_at_kill is None:
            self.seen_at_kill = self.store.seen
            self.server.kill()
        if self.polled >= self.start_at and self.server.proc.poll() is not None:
            self.server.start()


def test_learner_survives_redis_dying_mid_stream(redis_aof, tmp_path):
    path = write_stream(tmp_path / "blobs.rec.gz", n_classes=3, per_class=60, shape=(8,))
    store = RedisStore(redis_client(redis_aof.url), 50, name="learner", fallback_capacity=20, retry_min_s=0)
    source = Outage(RecordedSource(path), redis_aof, store, kill_at=60, start_at=120)
    registry = CollectorRegistry()
    cpu = torch.device("cpu")
    make = partial(build_learner, "er", "mlp", device=cpu, buffer=store, hparams={"replay_batch_size": 5})
    options = RunOptions(batch_size=10, progress=False, probe_every=10**6)
    summary, _ = run_stream(source, make, Metrics(registry), options)

    assert summary.learned == 180, "every record was learned, Redis or not"
    assert store.stats().errors == 6, "one failed step per batch while Redis was down (no back-off wait)"
    assert registry.get_sample_value("streamcl_buffer_errors_total") == 6
    assert source.seen_at_kill == 60
    assert len(store.fallback) == 20 and store.fallback.policy.seen == 60, "the outage's batches went local"
    assert store.seen == 120, "after the restart the learner writes to the shared buffer again (AOF kept 60)"
    assert registry.get_sample_value("streamcl_buffer_size") == 50


def test_build_learner_opens_a_redis_buffer_from_a_spec(redis_server):
    url = f"{redis_server.url}?name=built"
    learner = build_learner("er", "mlp", (8,), np.dtype(np.float32), device=torch.device("cpu"), buffer_spec=url)
    assert isinstance(learner.buffer, RedisStore) and learner.buffer.name == "built"


def test_buffer_gauges_during_an_outage_describe_the_fallback(redis_aof, tmp_path):
    """While Redis is down replay draws from the local fallback: the buffer gauges say so, not the last reply."""
    path = write_stream(tmp_path / "blobs.rec.gz", n_classes=3, per_class=60, shape=(8,))
    store = RedisStore(redis_client(redis_aof.url), 100, name="gauges", fallback_capacity=20, retry_min_s=0)
    source = Outage(RecordedSource(path), redis_aof, store, kill_at=100, start_at=10**6)
    registry = CollectorRegistry()
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), buffer=store)
    run_stream(source, make, Metrics(registry), RunOptions(batch_size=10, progress=False, probe_every=10**6))

    local = store.fallback.stats(classes=True)
    assert store.seen == 100 and local.size == 20, "the shared buffer held 100 when Redis died; the fallback 20"
    assert registry.get_sample_value("streamcl_buffer_size") == 20
    assert registry.get_sample_value("streamcl_buffer_bytes") == local.nbytes
    per_class = [
        registry.get_sample_value("streamcl_buffer_class_samples", {"level": "0", "class": name}) or 0
        for name in ("c0", "c1", "c2")
    ]
    assert sum(per_class) == 20 and per_class == [local.class_counts.get((0, y), 0) for y in range(3)]
