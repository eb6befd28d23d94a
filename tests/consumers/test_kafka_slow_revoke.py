"""A revoke that waits for a slow learner step keeps the member in its group (kafka-python, real broker)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest

from consumers.kafka import KafkaSource
from consumers.producer import produce_messages
from consumers.source import next_offsets
from tests.consumers.streams import good_messages
from tests.consumers.test_kafka import _learn, _wait

SESSION = {"session_timeout_ms": 4000, "heartbeat_interval_ms": 1000}
"""Short enough for the slow step to outlast it three times, long enough for a loaded 2-core machine."""
STEP_S = 12.0


def test_a_learner_step_longer_than_the_session_timeout_keeps_the_member(
    kafka_bootstrap, make_topic, caplog: pytest.LogCaptureFixture
) -> None:
    """A holds a batch for three session timeouts while B's join revokes A's partitions: the revoke's wait for
    A's commit must not stop A's heartbeats, or the group evicts A, refuses the commit on revoke and B learns
    A's batch again from the older committed offset."""
    caplog.set_level(logging.WARNING)
    topic = make_topic(2)
    messages = good_messages(40)
    produce_messages(kafka_bootstrap, topic, messages)
    seen_a: list[str] = []
    seen_b: list[str] = []
    stop_a, stop_b = threading.Event(), threading.Event()
    with KafkaSource(kafka_bootstrap, topic, "slow-revoke", **SESSION) as a:
        _wait(lambda: len(a.assignment()) == 2)
        first = a.poll(5.0, 10)
        assert len(first)
        with KafkaSource(kafka_bootstrap, topic, "slow-revoke", **SESSION) as b:
            thread_b = threading.Thread(target=_learn, args=(b, seen_b, stop_b))
            thread_b.start()
            time.sleep(STEP_S)  # the slow step: B's join has A's partitions revoked meanwhile
            seen_a.extend(r.id for r in first.records)
            a.commit(next_offsets(first.positions()))
            thread_a = threading.Thread(target=_learn, args=(a, seen_a, stop_a))
            thread_a.start()
            _wait(lambda: len(set(seen_a) | set(seen_b)) == 40)
            assert b.assignment()  # B did take partitions over
            time.sleep(0.5)  # anything delivered twice would show up now
            stop_a.set()
            stop_b.set()
            thread_a.join()
            thread_b.join()
    both = Counter(seen_a) + Counter(seen_b)
    assert set(both) == {m.key.decode() for m in messages}
    assert max(both.values()) == 1, sorted(k for k, n in both.items() if n > 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "session expired" in w or "commit on revoke failed" in w], warnings
