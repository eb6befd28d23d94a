"""Null key, value and header values through ``record`` against a real broker (tansu): a recording replays as
the live topic reads, a tombstone and an empty value alike, a null key and an empty one apart."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import Producer

from consumers.capture import record_topic
from consumers.kafka import KafkaSource
from consumers.record import DeadLetter
from consumers.recorded import RecordedSource, read_messages
from tests.consumers.streams import good_messages
from tests.consumers.test_kafka_lag_and_faults import _drain
from tests.fixtures.kafka import FAST_GROUP


def _seen(entries: list) -> list[tuple]:
    """What the run gets from each entry: a dead letter's message and reason, a record's sample and message."""
    return [
        (e.message, e.reason, e.detail) if isinstance(e, DeadLetter) else (e.id, e.label, e.position, e.message)
        for e in entries
    ]


def test_a_recording_of_tombstones_and_null_keys_and_headers_replays_as_the_live_topic_reads(
    kafka_bootstrap, make_topic, tmp_path: Path
) -> None:
    topic = make_topic(1)
    good = good_messages(1)[0]
    # kafka-python's producer refuses a null header value; librdkafka's sends one
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, key=b"k", value=None)  # a tombstone
    producer.produce(topic, key=b"k", value=b"")
    producer.produce(topic, key=b"", value=b"{}")
    producer.produce(topic, key=None, value=good.value, headers=[*good.headers, ("note", None), ("empty", b"")])
    assert producer.flush(10) == 0
    with KafkaSource(kafka_bootstrap, topic, "live", **FAST_GROUP) as source:
        live = _drain(source, 4)
    assert record_topic(kafka_bootstrap, topic, tmp_path / "t.rec.gz", until_idle_s=1.0) == 4
    with RecordedSource(tmp_path / "t.rec.gz") as source:
        replayed = _drain(source, 4)
    assert source.poll().records == [] and source.exhausted
    assert _seen(replayed) == _seen(live)
    tombstone, empty, empty_key, null_key = read_messages(tmp_path / "t.rec.gz")
    assert [tombstone.key, empty.key, empty_key.key, null_key.key] == [b"k", b"k", b"", None]
    assert tombstone.value == b"" == empty.value  # as the live source reads a tombstone (message_from_record)
    assert dict(null_key.headers)["note"] == b"" == dict(null_key.headers)["empty"]
    assert [e.reason for e in live[:3]] == ["bad_json", "bad_json", "missing_field"] and live[3].id == "good-0"
    assert live[0].detail == live[1].detail == "empty value (a tombstone, or a message without a value)"
