"""KafkaSource where the offset to read is not in the partition: a checkpoint's offset past the end of a recreated
topic, records deleted before they were read. Nothing is skipped silently, and a stale offset never freezes the
group's commits.

tansu (the test broker) answers a fetch past the end with no records, never with OFFSET_OUT_OF_RANGE, and never
deletes records; where a test needs what a real broker and kafka-python do then (the client moves to the earliest
offset left), a small ``KafkaConsumer`` subclass plays it.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from consumers import kafka as kafka_source
from consumers.kafka import KafkaSource
from consumers.kafka_librdkafka import LibrdkafkaConsumer
from consumers.producer import produce_messages
from consumers.source import NextOffsets, next_offsets
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from stream_cl.publishing import Publisher
from tests.consumers.streams import good_messages
from tests.consumers.test_batched_sources import PER_MESSAGE, batched
from tests.fixtures.kafka import FAST_GROUP


def _learn_until(source: KafkaSource, n: int, timeout_s: float = 30.0) -> list:
    """A stand-in learner: poll, commit what it took, until ``n`` records came."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} records came"
        poll = source.poll(0.5, 4)
        if len(poll):
            got += poll.records
            source.commit(next_offsets(poll.positions()))
    return got


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _group_offset(bootstrap: str, group: str, topic: str, partition: int = 0) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, partition))
    finally:
        consumer.close()


class _ResetToEarliest(KafkaConsumer):
    """kafka-python fetching at a seek target past the partition's end on a real broker: OFFSET_OUT_OF_RANGE, and
    with ``auto_offset_reset="earliest"`` it moves to offset 0 (logged at INFO only)."""

    def seek(self, partition, offset):
        super().seek(partition, 0 if offset >= 100 else offset)


@pytest.fixture
def past_end_after_2s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_source, "_PAST_END_S", 2.0)  # not 30 s: a recreated topic is one all along


@pytest.mark.parametrize("client", [KafkaConsumer, LibrdkafkaConsumer], ids=["kafka-python", "librdkafka"])
def test_a_checkpoint_offset_past_the_end_starts_again_at_the_beginning(
    kafka_bootstrap, make_topic, caplog, past_end_after_2s, client
) -> None:
    """The topic was recreated after the checkpoint: its records, and those that come later, are all learned (with
    librdkafka too, which knows no position before its first message)."""
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(5))
    checkpoint = NextOffsets({(topic, 0): 100})
    group = f"past-end-{client.__name__}"
    options = {"start_offsets": checkpoint, "from_checkpoint": True, "consumer_class": client, **FAST_GROUP}
    with (
        caplog.at_level(logging.WARNING, logger="consumers.kafka"),
        KafkaSource(kafka_bootstrap, topic, group, **options) as s,
    ):
        first = _learn_until(s, 5)
        produce_messages(kafka_bootstrap, topic, good_messages(5))
        later = _learn_until(s, 5)
    assert [r.position.offset for r in first + later] == list(range(10))
    assert s.skipped_offsets() == {}  # nothing of this topic was skipped
    assert _group_offset(kafka_bootstrap, group, topic) == 10
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(topic in m and "partition 0" in m and "offset 100" in m and "offset 0" in m for m in warned), warned


def test_commits_go_on_after_the_client_moved_back_from_a_stale_start_offset(
    kafka_bootstrap, make_topic, caplog
) -> None:
    """The client moved from the checkpoint's offset (100) to 0 itself: that is logged, and the learner's commits
    of offsets below 100 reach the group, which ends at 5, not 100."""
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(5))
    checkpoint = NextOffsets({(topic, 0): 100})
    group = "moved-back"
    with (
        caplog.at_level(logging.WARNING, logger="consumers.kafka"),
        KafkaSource(
            kafka_bootstrap,
            topic,
            group,
            start_offsets=checkpoint,
            from_checkpoint=True,
            consumer_class=_ResetToEarliest,
            commit_interval_s=0,
            **FAST_GROUP,
        ) as s,
    ):
        got = _learn_until(s, 5)
        _wait(lambda: s.committed == {(topic, 0): 5})
    assert [r.position.offset for r in got] == list(range(5))
    assert _group_offset(kafka_bootstrap, group, topic) == 5
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(topic in m and "partition 0" in m and "offset 100" in m and "offset 0" in m for m in warned), warned


def test_a_partition_moved_to_another_member_after_a_reset_starts_where_the_learner_got(
    kafka_bootstrap, make_topic
) -> None:
    """A starts both partitions from a stale checkpoint and the client moves them to 0; B joins: the partition B
    takes over starts at what A's learner committed (not at 100): every record is learned once."""
    topic = make_topic(2)
    produce_messages(kafka_bootstrap, topic, good_messages(10), keep_partitions=False)
    checkpoint = NextOffsets({(topic, 0): 100, (topic, 1): 100})
    group = "handover-after-reset"
    options = {"commit_interval_s": 0, **FAST_GROUP}
    learned: list = []
    stop = threading.Event()

    def learner(source: KafkaSource) -> None:
        while not stop.is_set():
            poll = source.poll(0.2, 4)
            if len(poll):
                learned.extend((r.position.partition, r.position.offset) for r in poll.records)
                source.commit(next_offsets(poll.positions()))

    a = KafkaSource(
        kafka_bootstrap,
        topic,
        group,
        start_offsets=checkpoint,
        from_checkpoint=True,
        consumer_class=_ResetToEarliest,
        **options,
    )
    threads = [threading.Thread(target=learner, args=(a,))]
    threads[0].start()
    try:
        _wait(lambda: len(learned) == 10 and not a._pending)
        b = KafkaSource(kafka_bootstrap, topic, group, **options)
        threads.append(threading.Thread(target=learner, args=(b,)))
        threads[1].start()
        try:
            _wait(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1)
            produce_messages(kafka_bootstrap, topic, good_messages(10), keep_partitions=False)
            _wait(lambda: len(learned) >= 20)
            time.sleep(1)  # anything learned twice would show up meanwhile
        finally:
            stop.set()
            for t in threads:
                t.join()
            b.close()
    finally:
        stop.set()
        a.close()
    assert sorted(learned) == sorted({(p, o) for p, o in learned})  # none twice
    assert len(learned) == 20


def test_a_high_watermark_that_lags_for_a_while_restarts_nothing(
    kafka_bootstrap, make_topic, caplog, past_end_after_2s
) -> None:
    """A new leader or a follower may report a high watermark below the consumer's position for a moment (an empty
    fetch): a caught-up partition must not be read again from its beginning."""
    lagging = {"until": 0.0}

    class LaggingLeader(KafkaConsumer):
        def highwater(self, partition):
            high = super().highwater(partition)
            return high - 2 if high is not None and time.monotonic() < lagging["until"] else high

    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(10))
    with (
        caplog.at_level(logging.WARNING, logger="consumers.kafka"),
        KafkaSource(kafka_bootstrap, topic, "lagging-leader", consumer_class=LaggingLeader, **FAST_GROUP) as s,
    ):
        got = _learn_until(s, 10)
        lagging["until"] = time.monotonic() + 1.5  # within the 2 s the position must stay past the end
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            poll = s.poll(0.2, 4)
            got += poll.records
            s.commit(next_offsets(poll.positions()))
    assert [r.position.offset for r in got] == list(range(10))
    assert not [r for r in caplog.records if "past the partition's end" in r.getMessage()]


@pytest.mark.parametrize(("beginning", "skipped"), [(3, 2), (0, 0)], ids=["deleted", "compacted"])
def test_records_deleted_before_they_were_read_are_counted(kafka_bootstrap, make_topic, caplog, beginning, skipped):
    """The start offset 1 is gone, the client moved to 3. With the partition's beginning at 3, offsets 1-2 were
    deleted unread: counted and logged. With it at 0, the gap is compaction's: nothing was deleted."""

    class Retention(KafkaConsumer):
        def seek(self, partition, offset):
            super().seek(partition, max(offset, 3))  # kafka-python's move to the earliest offset left

        def beginning_offsets(self, partitions, timeout_ms=None):
            return {tp: beginning for tp in partitions}

    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(6))
    start = {(topic, 0): 1}
    with (
        caplog.at_level(logging.WARNING, logger="consumers.kafka"),
        KafkaSource(
            kafka_bootstrap, topic, "deleted", start_offsets=start, consumer_class=Retention, **FAST_GROUP
        ) as s,
    ):
        got = _learn_until(s, 3)
        if skipped:  # told apart at the next lag refresh, within a second or two
            _wait(lambda: s.skipped_offsets() != {})
        else:
            time.sleep(2.5)
    assert [r.position.offset for r in got] == [3, 4, 5]
    assert s.skipped_offsets() == ({"out_of_range": skipped} if skipped else {})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "deleted" in r.getMessage()]
    assert len(warned) == (1 if skipped else 0), warned


def test_a_partly_learned_message_of_the_old_topic_skips_nothing_of_the_new_one(
    kafka_bootstrap, make_topic, past_end_after_2s
) -> None:
    """The checkpoint held 3 samples of message 20 as learned; the topic was recreated: message 20 of the new topic
    is another message, and all its samples are handed over."""
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, batched(topic))  # offsets 0-8, 60 samples
    checkpoint = NextOffsets({(topic, 0): 20}, within={(topic, 0): 3})
    with KafkaSource(
        kafka_bootstrap, topic, "old-within", start_offsets=checkpoint, from_checkpoint=True, **FAST_GROUP
    ) as s:
        got = _learn_until(s, 60)
        for _ in range(2):  # offsets 9-26
            produce_messages(kafka_bootstrap, topic, batched(topic))
        got += _learn_until(s, 120)
    positions = [(r.position.offset, r.position.index) for r in got]
    assert len(set(positions)) == len(positions) == 180
    assert sum(1 for offset, _ in positions if offset == 20) == PER_MESSAGE


def test_records_skipped_reach_the_metric() -> None:
    """``streamcl_offsets_skipped_total`` is 0 from the start and follows the cumulative count of the sample
    source and the label topic's consumer together."""
    source, labels = _InstrumentedStub(), _InstrumentedStub()
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(metrics, label_sources=[labels])

    def value() -> float | None:
        publisher.gauges(time.monotonic(), None, PrequentialAccuracy(), source)
        return metrics.registry.get_sample_value("streamcl_offsets_skipped_total", {"reason": "out_of_range"})

    assert value() == 0
    source.skipped = {"out_of_range": 2}
    assert value() == 2
    source.skipped = {"out_of_range": 5}
    assert (value(), value()) == (5, 5)
    labels.skipped = {"out_of_range": 3}
    assert value() == 8


def test_the_label_topic_lag_is_published_with_the_sample_topic_lag() -> None:
    source, labels = _InstrumentedStub(), _InstrumentedStub()
    source.lags, labels.lags = {("features", 0): 3}, {("labels", 0): 7, ("labels", 1): 0}
    metrics = Metrics(CollectorRegistry())
    Publisher(metrics, label_sources=[labels]).gauges(time.monotonic(), None, PrequentialAccuracy(), source)
    lag = {
        (s.labels["topic"], s.labels["partition"]): s.value
        for family in metrics.registry.collect()
        if family.name == "streamcl_consumer_lag"
        for s in family.samples
    }
    assert lag == {("features", "0"): 3, ("labels", "0"): 7, ("labels", "1"): 0}


class _InstrumentedStub:
    """The parts of a Kafka source the publisher reads."""

    assigned_at = None
    skipped: dict[str, int] = {}  # noqa: RUF012 (replaced, never mutated)

    lags: dict[tuple[str, int], int] = {}  # noqa: RUF012 (replaced, never mutated)

    def lag(self) -> dict:
        return dict(self.lags)

    def assignment(self) -> set:
        return set()

    def take_decode_seconds(self) -> list[float]:
        return []

    def skipped_offsets(self) -> dict[str, int]:
        return dict(self.skipped)
