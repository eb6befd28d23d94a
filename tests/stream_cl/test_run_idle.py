"""``--until-idle`` against the real broker: a consumer whose partitions still hold records it has not read is
not idle, however long its fetches take."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import partial

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.kafka import KafkaSource
from consumers.record import Poll
from monitoring.metrics import Metrics
from stream_cl import run
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, run_stream
from tests.consumers.test_kafka import STABLE_GROUP
from tests.stream_cl.test_serve_kafka import BAD, produce


class SlowFetches(KafkaSource):
    """Fetches that come back empty for ``hold_s`` after the first assignment, as from a broker under load or
    a group still rebalancing: the records wait on the partitions, and the consumer's lag says so."""

    hold_s = 4.0

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        if self.assigned_at is None or time.monotonic() - self.assigned_at < self.hold_s:
            time.sleep(timeout_s)
            return Poll()
        return super().poll(timeout_s, max_records)


class NoFetches(SlowFetches):
    """Records that never arrive, as from a partition whose leader is gone."""

    hold_s = float("inf")


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


def test_records_that_wait_unread_without_progress_end_the_wait_with_a_warning(
    kafka_bootstrap: str, make_topic: Callable[..., str], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    topic = make_topic(2)
    produce(kafka_bootstrap, topic, 20)
    monkeypatch.setattr(run, "ASSIGNMENT_GRACE_S", 5.0)  # 60 s in service; the group forms in about 3 s
    learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), width=16, buffer_size=50)
    options = RunOptions(batch_size=10, until_idle_s=1.0, progress=False)
    with NoFetches(kafka_bootstrap, topic, f"g-{topic}", **STABLE_GROUP) as source, caplog.at_level("WARNING"):
        started = time.monotonic()
        summary, _ = run_stream(source, learner, Metrics(CollectorRegistry()), options)
    assert summary.consumed == 0 and time.monotonic() - started >= 6.0  # the idle bound, then the grace
    assert re.search(rf"records waited unread for \d+ s without progress, stopping: .*'{topic}', 0\)", caplog.text)
