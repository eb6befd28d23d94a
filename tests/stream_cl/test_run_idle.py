"""``--until-idle`` against the real broker: a consumer whose partitions still hold records it has not read is
not idle, however long its fetches take."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from prometheus_client import CollectorRegistry

from consumers.kafka import KafkaSource
from consumers.record import Poll
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, run_stream
from tests.consumers.test_kafka import STABLE_GROUP
from tests.stream_cl.test_serve_kafka import BAD, produce

HOLD_S = 4.0


class SlowFetches(KafkaSource):
    """Fetches that come back empty for ``HOLD_S`` after the first assignment, as from a broker under load or
    a group still rebalancing: the records wait on the partitions, and the consumer's lag says so."""

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        if self.assigned_at is None or time.monotonic() - self.assigned_at < HOLD_S:
            time.sleep(timeout_s)
            return Poll()
        return super().poll(timeout_s, max_records)


def test_a_consumer_whose_partitions_hold_unread_records_is_not_idle(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(2)
    where = produce(kafka_bootstrap, topic, 200)
    learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), width=16, buffer_size=50)
    options = RunOptions(batch_size=10, until_idle_s=1.0, progress=False)
    with SlowFetches(kafka_bootstrap, topic, f"g-{topic}", **STABLE_GROUP) as source:
        summary, _ = run_stream(source, learner, Metrics(CollectorRegistry()), options)
    assert summary.consumed == len(where) + BAD  # not stopped after 1 s of empty fetches
    assert summary.learned == len(where)
