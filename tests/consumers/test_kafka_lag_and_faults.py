"""KafkaSource against a real broker (tansu): true lag, checkpoint start rules, missing topics, and a fetch
thread that survives failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata

import consumers.kafka
from consumers.capture import record_topic
from consumers.kafka import KafkaSource, TopicNotFoundError
from consumers.open import open_source
from consumers.record import Message, Position
from consumers.source import next_offsets
from consumers.wire import encode_binary
from tests.consumers.streams import good_messages
from tests.fixtures.kafka import FAST_GROUP


def _produce_one_per_batch(bootstrap: str, topic: str, messages: list[Message], partitions: int) -> None:
    """Each message in a batch of its own, message ``i`` to partition ``i % partitions``.

    tansu's memory storage answers ListOffsets(LATEST) with the last batch's base offset + 1, so one-record
    batches make the broker's end offset exact for partitions the consumer has not fetched yet.
    """
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, enable_idempotence=False)
    try:
        for i, m in enumerate(messages):
            producer.send(topic, m.value, key=m.key, headers=list(m.headers), partition=i % partitions).get(10)
    finally:
        producer.close()


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _drain(source: KafkaSource, n: int, timeout_s: float = 20.0) -> list:
    """``n`` entries (records and dead letters), in the order the source hands them out."""
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} arrived"
        poll = source.poll(0.5, n - len(out))
        out += sorted([*poll.records, *poll.dead_letters], key=_offset)
    return out


def _offset(entry) -> tuple[int, int]:
    pos = entry.position if hasattr(entry, "position") else entry.message.position
    return pos.partition, pos.offset


def test_lag_counts_unfetched_partitions_and_follows_an_idle_stream(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(4)
    _produce_one_per_batch(kafka_bootstrap, topic, good_messages(100), 4)
    every = {(topic, p) for p in range(4)}
    with KafkaSource(kafka_bootstrap, topic, "lag", prefetch=10, max_poll_records=10, **FAST_GROUP) as s:
        # nothing handed over yet, and at most 10 records fetched: every partition's 25 records count
        _wait(lambda: s.lag() == dict.fromkeys(every, 25))
        assert s.assignment() == every
        assert len(_drain(s, 100)) == 100
        _wait(lambda: s.lag() == dict.fromkeys(every, 0))  # caught up: no frozen values
        _produce_one_per_batch(kafka_bootstrap, topic, good_messages(7), 1)
        _wait(lambda: s.lag() == {**dict.fromkeys(every, 0), (topic, 0): 7})
        assert len(_drain(s, 7)) == 7
        _wait(lambda: s.lag() == dict.fromkeys(every, 0))


def _committed(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close()


def test_checkpoint_offsets_decide_every_start_and_are_committed(kafka_bootstrap, make_topic) -> None:
    """The group is ahead of the model (8 and 9); the checkpoint holds partition 0 only."""
    topic = make_topic(2)
    _produce_one_per_batch(kafka_bootstrap, topic, good_messages(20), 2)
    ahead = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id="ckpt", enable_auto_commit=False)
    ahead.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in ((0, 8), (1, 9))})
    ahead.close()
    assert _committed(kafka_bootstrap, topic, "ckpt", 2) == {0: 8, 1: 9}
    url = f"kafka://{kafka_bootstrap}/{topic}"
    start = {(topic, 0): 3}
    with open_source(url, group="ckpt", start_offsets=start, from_checkpoint=True, kafka_options=FAST_GROUP) as s:
        got = _drain(s, 7 + 10)
        _wait(lambda: s.committed == {(topic, 0): 3, (topic, 1): 0})
        assert _committed(kafka_bootstrap, topic, "ckpt", 2) == {0: 3, 1: 0}
    assert [_offset(r) for r in got] == sorted([(0, o) for o in range(3, 10)] + [(1, o) for o in range(10)])


def test_a_decoder_that_raises_costs_one_record_as_an_internal_dead_letter(
    kafka_bootstrap, make_topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = make_topic(1)
    _produce_one_per_batch(kafka_bootstrap, topic, good_messages(10), 1)
    real = consumers.kafka.decode_samples

    def flaky(message: Message, max_bytes: int):
        if message.key == b"good-4":
            raise KeyError("decoder bug")
        return real(message, max_bytes)

    monkeypatch.setattr(consumers.kafka, "decode_samples", flaky)
    with KafkaSource(kafka_bootstrap, topic, "internal", **FAST_GROUP) as s:
        got = _drain(s, 10)
        dead = [e for e in got if not hasattr(e, "position")]
        assert [(d.message.key, d.reason) for d in dead] == [(b"good-4", "internal")]
        assert "KeyError" in dead[0].detail and "decoder bug" in dead[0].detail
        assert [e.id for e in got if hasattr(e, "position")] == [f"good-{i}" for i in range(10) if i != 4]
        s.commit(next_offsets(e.position for e in got if hasattr(e, "position")))


def test_a_failed_fetch_turn_is_retried_without_losing_its_records(
    kafka_bootstrap, make_topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = make_topic(1)
    _produce_one_per_batch(kafka_bootstrap, topic, good_messages(20), 1)
    real = consumers.kafka.message_from_record
    failures = []

    def fails_twice(record):
        if len(failures) < 2:
            failures.append(record.offset)
            raise RuntimeError("transient")
        return real(record)

    monkeypatch.setattr(consumers.kafka, "message_from_record", fails_twice)
    with KafkaSource(kafka_bootstrap, topic, "retry", **FAST_GROUP) as s:
        got = _drain(s, 20)
        assert len(failures) == 2
        assert [r.id for r in got] == [f"good-{i}" for i in range(20)]  # none lost, none twice
        assert not len(s.poll(0.5, 10))


def _topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_a_missing_topic_is_an_error_and_is_not_created(kafka_bootstrap, make_topic, tmp_path: Path) -> None:
    missing = f"missing-{time.monotonic_ns()}"
    with pytest.raises(TopicNotFoundError, match=f"topic '{missing}' does not exist on {kafka_bootstrap}"):
        open_source(f"kafka://{kafka_bootstrap}/{missing}", require_topic=True, kafka_options=FAST_GROUP)
    with pytest.raises(TopicNotFoundError, match="does not exist"):
        record_topic(kafka_bootstrap, missing, tmp_path / "r.rec.gz", until_idle_s=0.5)
    assert missing not in _topics(kafka_bootstrap)
    existing = make_topic(1)
    with open_source(f"kafka://{kafka_bootstrap}/{existing}", require_topic=True, kafka_options=FAST_GROUP) as s:
        assert s.exhausted is False


class _RefusesFirstCommit(KafkaConsumer):
    """A client whose first commit the broker refuses, as it does while the group rebalances."""

    refused = 0

    def commit(self, offsets=None):
        if not type(self).refused:
            type(self).refused += 1
            raise CommitFailedError("the group is rebalancing")
        return super().commit(offsets)


def test_a_refused_commit_is_sent_again_without_a_new_commit_from_the_learner(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(1)
    _produce_one_per_batch(kafka_bootstrap, topic, good_messages(5), 1)
    with KafkaSource(kafka_bootstrap, topic, "refused", consumer_class=_RefusesFirstCommit, **FAST_GROUP) as s:
        s.commit(next_offsets(r.position for r in _drain(s, 5)))  # the learner's only commit
        _wait(lambda: s.committed == {(topic, 0): 5})
    assert _RefusesFirstCommit.refused == 1
    assert _committed(kafka_bootstrap, topic, "refused", 1) == {0: 5}


def test_large_messages_are_fetched_ahead_up_to_the_byte_bound_not_the_record_count(
    kafka_bootstrap, make_topic
) -> None:
    """80 messages of 64 KiB: a record-count bound alone (2,000) would hold all 5 MiB ahead of the learner."""
    topic = make_topic(1)
    features = np.arange(16384, dtype=np.float32)
    messages = []
    for i in range(80):
        value, headers = encode_binary(f"big-{i}", features, "a")
        messages.append(Message(Position(topic, 0, i), 0.0, f"big-{i}".encode(), value, tuple(headers)))
    _produce_one_per_batch(kafka_bootstrap, topic, messages, 1)
    bound = 2 * 1024 * 1024
    with KafkaSource(kafka_bootstrap, topic, "big", prefetch_bytes=bound, **FAST_GROUP) as s:
        _wait(lambda: s.buffered_bytes >= bound)
        time.sleep(1.0)  # a fetch thread that ignored the bound would keep fetching meanwhile
        assert bound <= s.buffered_bytes <= bound + 16 * 70 * 1024  # one fetch past it at most (16 messages)
        got = _drain(s, 80)
        assert [r.id for r in got] == [f"big-{i}" for i in range(80)]  # paused and resumed, nothing lost
        assert s.buffered_bytes == 0
