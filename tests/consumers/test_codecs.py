"""Every Kafka compression codec, written by a client the project did not write (librdkafka, through
confluent-kafka), is read by the Kafka source and learned: none, gzip, snappy, lz4 and zstd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumers.kafka import KafkaSource
from consumers.producer import produce_messages
from consumers.record import Message
from tests.consumers.streams import good_messages
from tests.fixtures.kafka import FAST_GROUP

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
BASE_MS = 1_700_000_000_000


def produce_with_librdkafka(bootstrap: str, topic: str, messages: list[Message], codec: str) -> None:
    """Send as a librdkafka producer does by default: batched, keyed, with headers and create timestamps."""
    from confluent_kafka import Producer

    failures: list[object] = []
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 50})
    for i, m in enumerate(messages):
        producer.produce(
            topic,
            value=m.value,
            key=m.key,
            headers=[*m.headers, ("producer", b"librdkafka")],
            timestamp=BASE_MS + i,
            on_delivery=lambda err, _msg: err is not None and failures.append(err),
        )
    assert producer.flush(30) == 0 and not failures, failures


def _take_all(source: KafkaSource, n: int, timeout_s: float = 30.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < n and time.monotonic() < deadline:
        poll = source.poll(0.5, n - len(records))
        assert not poll.dead_letters, poll.dead_letters
        records += poll.records
    return records


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_is_decoded_with_keys_headers_and_timestamps(
    kafka_bootstrap: str, make_topic, monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    from kafka.record import default_records

    calls = {name: 0 for name in CODECS[1:]}
    for name in calls:  # count the decompressions, to know the broker kept the batches compressed
        real = getattr(default_records, f"{name}_decode")

        def counted(payload: bytes, _real=real, _name=name) -> bytes:
            calls[_name] += 1
            return _real(payload)

        monkeypatch.setattr(default_records, f"{name}_decode", counted)
    topic = make_topic(1)
    messages = good_messages(60)  # JSON and binary values, alternating: both compress
    produce_with_librdkafka(kafka_bootstrap, topic, messages, codec)
    with KafkaSource(kafka_bootstrap, topic, f"codec-{codec}", **FAST_GROUP) as source:
        records = _take_all(source, len(messages))
    assert [r.id for r in records] == [m.key.decode() for m in messages]
    assert [r.position.offset for r in records] == list(range(len(messages)))
    assert [r.message.key for r in records] == [m.key for m in messages]
    assert [r.message.headers for r in records] == [(*m.headers, ("producer", b"librdkafka")) for m in messages]
    assert [r.timestamp for r in records] == [(BASE_MS + i) / 1000 for i in range(len(messages))]
    for r, m in zip(records, messages, strict=True):
        assert r.message.value == m.value
    assert {name for name, n in calls.items() if n} == (set() if codec == "none" else {codec})


def test_cli_learns_a_topic_written_in_every_codec(kafka_bootstrap: str, make_topic, tmp_path: Path) -> None:
    topic = make_topic(2)
    messages = good_messages(100)
    for i, codec in enumerate(CODECS):
        produce_with_librdkafka(kafka_bootstrap, topic, messages[20 * i : 20 * i + 20], codec)
    out = tmp_path / "summary.json"
    args = ["run", "--source", f"kafka://{kafka_bootstrap}/{topic}", "--until-idle", "5", "--summary-json", str(out)]
    args += ["--metrics-port", "0", "--no-progress", "--probe-fraction", "0", "--kafka-session-timeout-ms", "2000"]
    done = subprocess.run(
        [sys.executable, "-m", "stream_cl", *args, "--width", "16"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert (summary["learned"], summary["dead_letter"]) == (len(messages), {})


@pytest.mark.parametrize("codec", CODECS)
def test_produce_compresses_in_each_codec_for_other_clients(
    kafka_bootstrap: str, make_topic, monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from kafka.record import default_records

    calls = {name: 0 for name in CODECS[1:]}
    for name in calls:
        real = getattr(default_records, f"{name}_encode")

        def counted(payload: bytes, _real=real, _name=name) -> bytes:
            calls[_name] += 1
            return _real(payload)

        monkeypatch.setattr(default_records, f"{name}_encode", counted)
    topic = make_topic(1)
    messages = good_messages(30)
    assert produce_messages(kafka_bootstrap, topic, messages, compression=codec) == len(messages)
    assert {name for name, n in calls.items() if n} == (set() if codec == "none" else {codec})
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "unused", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])  # no group join: tansu delays the first
        got: list = []
        deadline = time.monotonic() + 30
        while len(got) < len(messages) and time.monotonic() < deadline:
            got += [m for m in consumer.consume(len(messages), 0.5) if m.error() is None]
    finally:
        consumer.close()
    assert [(m.key(), m.value(), tuple(m.headers() or ())) for m in got] == [
        (m.key, m.value, m.headers) for m in messages
    ]


def test_produce_refuses_an_unknown_codec() -> None:
    with pytest.raises(ValueError, match="compression must be one of"):
        produce_messages("127.0.0.1:1", "t", [], compression="brotli")
