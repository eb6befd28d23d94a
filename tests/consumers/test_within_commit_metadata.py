"""The samples done of a partly learned message travel with the group's committed offset (commit metadata), so a
consumer that takes a partition over without a checkpoint resumes at the sample, as one from a checkpoint does.

tansu 0.6 (the test broker) accepts an OffsetCommit's ``committed_metadata`` but answers every OffsetFetch with
null metadata, for kafka-python and librdkafka alike (checked by the first test). Apache Kafka keeps it, so
the clients here keep the metadata of each commit beside the broker, on the real broker's offsets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import replace

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from consumers.kafka import KafkaSource, within_from_metadata, within_metadata
from consumers.kafka_librdkafka import LibrdkafkaConsumer
from consumers.producer import produce_messages
from consumers.source import NextOffsets, next_offsets
from tests.consumers.test_batched_sources import N_SAMPLES, PER_MESSAGE, batched, ids_of, take
from tests.consumers.test_kafka import STABLE_GROUP, _wait
from tests.fixtures.kafka import FAST_GROUP

CLIENTS = pytest.mark.parametrize("client", [KafkaConsumer, LibrdkafkaConsumer], ids=["kafka-python", "librdkafka"])


def keeping_metadata(client: type, store: dict) -> type:
    """``client`` whose commits' metadata is kept in ``store`` and returned with the broker's committed offset."""

    class Client(client):
        def __init__(self, **options) -> None:
            super().__init__(**options)
            self._group = options["group_id"]

        def _keep(self, offsets) -> None:
            for tp, om in offsets.items():
                store[(self._group, tp.topic, tp.partition)] = (om.offset, om.metadata)

        def commit(self, offsets) -> None:
            super().commit(offsets)
            self._keep(offsets)

        def commit_async(self, offsets):
            answer = super().commit_async(offsets)
            self._keep(offsets)
            return answer

        def committed(self, partition, metadata=False):
            answer = super().committed(partition, metadata=metadata)
            if metadata and answer is not None:
                kept = store.get((self._group, partition.topic, partition.partition))
                if kept is not None and kept[0] == answer.offset:
                    return OffsetAndMetadata(answer.offset, kept[1], -1)
            return answer

    return Client


def test_the_metadata_format_reads_back_only_what_stream_cl_wrote():
    assert [within_from_metadata(within_metadata(n)) for n in (0, 1, 6, 4095)] == [0, 1, 6, 4095]
    hostile = ["streamcl:within=0", "streamcl:within=-1", "streamcl:within=4096", "streamcl:within=3 ", "x", "{}"]
    hostile += ["streamcl:within=03", "streamcl:within=9" * 1000, "streamcl:within=١", b"streamcl:within=3", 3]
    assert [within_from_metadata(m) for m in hostile] == [None] * len(hostile)


@CLIENTS
def test_tansu_drops_commit_metadata(kafka_bootstrap, make_topic, client):
    """Why the tests keep metadata beside the broker; fails once tansu keeps it (then drop ``keeping_metadata``)."""
    topic = make_topic(1)
    consumer = client(bootstrap_servers=kafka_bootstrap, group_id=f"meta-{topic}", enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, within_metadata(3), -1)})
        answer = consumer.committed(TopicPartition(topic, 0), metadata=True)
    finally:
        consumer.close()
    assert answer.offset == 2 and answer.metadata in (None, "")


def learn_part(bootstrap: str, topic: str, options: dict) -> list:
    """In group "g": learn message 0 and the first 3 samples of message 1, committing after each poll."""
    with KafkaSource(bootstrap, topic, "g", **options) as first:
        polls = take(first, PER_MESSAGE + 3, limit=5)
        for poll in polls:
            first.commit(next_offsets(poll.positions()))
    assert first.committed == {(topic, 0): 1}
    return polls


@CLIENTS
def test_a_consumer_of_the_group_resumes_a_partly_learned_message_at_the_sample(kafka_bootstrap, make_topic, client):
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, batched(topic))
    store: dict = {}
    options = {"consumer_class": keeping_metadata(client, store), "commit_interval_s": 0, **FAST_GROUP}
    polls = learn_part(kafka_bootstrap, topic, options)
    with KafkaSource(kafka_bootstrap, topic, "g", **options) as second:
        rest = take(second, N_SAMPLES - PER_MESSAGE - 3)
        second.commit(next_offsets(p for poll in rest for p in poll.positions()))
    assert ids_of(polls) + ids_of(rest) == [f"s{i}" for i in range(N_SAMPLES)]  # each once, in order
    assert store[("g", topic, 0)] == (N_SAMPLES // PER_MESSAGE + 1, "")  # nothing partly learned any more


@CLIENTS
def test_commit_metadata_another_tool_wrote_is_ignored_with_one_warning(kafka_bootstrap, make_topic, client, caplog):
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, batched(topic))
    store: dict = {}
    options = {"consumer_class": keeping_metadata(client, store), "commit_interval_s": 0, **FAST_GROUP}
    learn_part(kafka_bootstrap, topic, options)
    store[("g", topic, 0)] = (1, 'offset-tool:v2 {"within": 3}')
    with (
        caplog.at_level(logging.WARNING, logger="consumers.kafka"),
        KafkaSource(kafka_bootstrap, topic, "g", **options) as second,
    ):
        again = take(second, N_SAMPLES - PER_MESSAGE)
    assert ids_of(again) == [f"s{i}" for i in range(PER_MESSAGE, N_SAMPLES)]  # message 1 from its first sample
    warnings = [r.getMessage() for r in caplog.records if "commit metadata" in r.getMessage()]
    assert len(warnings) == 1 and "offset-tool" in warnings[0]


@CLIENTS
def test_a_partition_moving_before_a_restored_message_is_finished_keeps_every_sample_once(
    kafka_bootstrap, make_topic, client
):
    """A restarts from a checkpoint taken mid-message on both partitions; B joins before A took any of it, so
    one of those messages moves to B, which must skip the samples the checkpoint holds as learned."""
    topic = make_topic(2)
    for p in (0, 1):  # the same 60 samples in both partitions
        moved = [replace(m, position=replace(m.position, partition=p)) for m in batched(topic)]
        produce_messages(kafka_bootstrap, topic, moved, keep_partitions=True)
    checkpoint = NextOffsets({(topic, 0): 3, (topic, 1): 3}, {(topic, 0): 3, (topic, 1): 3})
    store: dict = {}
    options = {"consumer_class": keeping_metadata(client, store), **STABLE_GROUP}
    group = f"restored-{topic}"
    stop = threading.Event()
    seen_a: list[tuple[int, str]] = []
    seen_b: list[tuple[int, str]] = []
    with KafkaSource(kafka_bootstrap, topic, group, start_offsets=checkpoint, from_checkpoint=True, **options) as a:
        _wait(lambda: a.committed == {(topic, 0): 3, (topic, 1): 3})  # the start offsets reached the group
        with KafkaSource(kafka_bootstrap, topic, group, **options) as b:
            _wait(lambda: a.assignment() and b.assignment() and not a.assignment() & b.assignment())
            threads = [
                threading.Thread(target=_learn_where, args=(a, seen_a, stop)),
                threading.Thread(target=_learn_where, args=(b, seen_b, stop)),
            ]
            for thread in threads:
                thread.start()
            _wait(lambda: len(set(seen_a) | set(seen_b)) >= 2 * (N_SAMPLES - 24))
            time.sleep(0.5)  # anything delivered twice would show up now
            stop.set()
            for thread in threads:
                thread.join()
    learned = Counter(seen_a) + Counter(seen_b)
    assert max(learned.values()) == 1, sorted(k for k, n in learned.items() if n > 1)
    assert sorted(learned) == sorted((p, f"s{i}") for p in (0, 1) for i in range(24, N_SAMPLES))


def _learn_where(source: KafkaSource, seen: list, stop: threading.Event) -> None:
    """:func:`_learn`, keeping each sample's partition (the sample ids repeat across partitions)."""
    while not stop.is_set():
        poll = source.poll(0.1, 5)
        seen.extend((r.position.partition, r.id) for r in poll.records)
        if len(poll):
            source.commit(next_offsets(poll.positions()))
