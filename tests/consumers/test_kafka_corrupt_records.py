"""Records the Kafka client cannot read, produced to a real broker (tansu): a header key that is not UTF-8 and a
record batch failing its CRC. kafka-python once raised ``CorruptRecordError`` once and then spun inside ``poll``
for good (no fetches, commits or lag, again after a restart); now each unreadable offset is an ``undecodable``
dead letter, the records after it arrive and the group's offset moves past it."""

from __future__ import annotations

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import default_records
from kafka.record.memory_records import MemoryRecords

from consumers.capture import record_topic
from consumers.kafka import KafkaSource, unreadable_records
from consumers.kafka_librdkafka import LibrdkafkaConsumer
from consumers.record import DeadLetter, Message, Position, Record
from consumers.recorded import RecordedSource
from consumers.source import next_offsets
from tests.consumers.streams import good_messages
from tests.consumers.test_kafka_lag_and_faults import _committed, _drain, _wait
from tests.fixtures.kafka import FAST_GROUP

BAD_KEY_AT = 2  # in the batch of offsets 0-4
CRC_BATCH = range(7, 10)
END = 12


class _NotUtf8(str):
    """A header key that kafka-python's producer writes as bytes that are not UTF-8 (it calls ``encode``)."""

    def encode(self, *args: object, **kwargs: object) -> bytes:
        return b"\xff\xfe"


def _produce(bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """Partition 0 gets the batches 0-4 (offset 2 with a header key that is not UTF-8), 5-6, 7-9 (its CRC wrong)
    and 10-11, one ``flush`` each; returns the messages, by offset."""
    messages = good_messages(END, topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=60_000, enable_idempotence=False)
    crc = default_records.calc_crc32c

    def batch(first: int, last: int) -> None:
        futures = []
        for m in messages[first : last + 1]:
            headers = [*m.headers, *([(_NotUtf8("zz"), b"h")] if m.position.offset == BAD_KEY_AT else [])]
            futures.append(producer.send(topic, m.value, key=m.key, headers=headers, partition=0))
        producer.flush()
        assert [f.get(10).offset for f in futures] == list(range(first, last + 1))

    try:
        batch(0, 4)
        batch(5, 6)
        with monkeypatch.context() as patch:
            patch.setattr(default_records, "calc_crc32c", lambda data: crc(data) ^ 1)
            batch(CRC_BATCH[0], CRC_BATCH[-1])
        batch(10, 11)
    finally:
        producer.close()
    return messages


def _position(entry: Record | DeadLetter) -> Position:
    return entry.message.position if isinstance(entry, DeadLetter) else entry.position


def _verdicts(entries: list) -> dict[int, str]:
    """Offset -> "ok" for a record, the reason for a dead letter."""
    return {_position(e).offset: e.reason if isinstance(e, DeadLetter) else "ok" for e in entries}


def test_unreadable_records_become_dead_letters_and_consumption_goes_on(kafka_bootstrap, make_topic, monkeypatch):
    topic = make_topic(1)
    messages = _produce(kafka_bootstrap, topic, monkeypatch)
    unreadable = {BAD_KEY_AT, 3, 4, *CRC_BATCH}  # kafka-python cannot read past a bad record in its batch
    expected = {o: "undecodable" if o in unreadable else "ok" for o in range(END)}
    with KafkaSource(kafka_bootstrap, topic, "corrupt", **FAST_GROUP) as source:
        entries = _drain(source, END)
        assert _verdicts(entries) == expected
        dead = [e for e in entries if isinstance(e, DeadLetter)]
        assert [d.message.position.offset for d in dead] == sorted(unreadable)
        assert all(d.message.position.partition == 0 and d.message.value == b"" for d in dead)
        assert all("cannot read offsets 2-4, the rest of their record batch" in d.detail for d in dead[:3])
        assert "UnicodeDecodeError" in dead[0].detail
        # a batch failing its CRC check does not say where it ends: one offset per fetch
        assert [d.detail.split(":")[0] for d in dead[3:]] == [
            f"the Kafka client cannot read offset {o}" for o in CRC_BATCH
        ]
        assert all("failed crc check" in d.detail for d in dead[3:])
        records = [e for e in entries if isinstance(e, Record)]
        assert [r.message.value for r in records] == [messages[o].value for o in range(END) if o not in unreadable]
        source.commit(next_offsets(map(_position, entries)))
        _wait(lambda: source.lag() == {(topic, 0): 0})  # the fetch thread is alive: lag, fetches and commits
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        producer.send(topic, messages[0].value, headers=list(messages[0].headers), partition=0).get(10)
        producer.close()
        [later] = _drain(source, 1)
        assert isinstance(later, Record) and later.position.offset == END
    assert _committed(kafka_bootstrap, topic, "corrupt", 1) == {0: END}


def test_a_restart_inside_an_unreadable_batch_moves_on(kafka_bootstrap, make_topic, monkeypatch) -> None:
    """The group resumes at offset 3, after the bad record of its batch: kafka-python reads the batch from its
    start again, so 3 and 4 are unreadable too."""
    topic = make_topic(1)
    _produce(kafka_bootstrap, topic, monkeypatch)
    with KafkaSource(kafka_bootstrap, topic, "resume", start_offsets={(topic, 0): 3}, **FAST_GROUP) as source:
        entries = _drain(source, END - 3)
    assert _verdicts(entries) == {o: "undecodable" if o in (3, 4, *CRC_BATCH) else "ok" for o in range(3, END)}


def test_librdkafka_dead_letters_only_the_message_whose_headers_it_cannot_convert(
    kafka_bootstrap, make_topic, monkeypatch
) -> None:
    """confluent-kafka raises SystemError for a header key that is not UTF-8, after ``consume()`` moved past the
    whole chunk; librdkafka does not check CRCs by default, so that batch reads."""
    topic = make_topic(1)
    messages = _produce(kafka_bootstrap, topic, monkeypatch)
    with KafkaSource(kafka_bootstrap, topic, "corrupt-rd", consumer_class=LibrdkafkaConsumer, **FAST_GROUP) as source:
        entries = _drain(source, END)
    assert _verdicts(entries) == {o: "undecodable" if o == BAD_KEY_AT else "ok" for o in range(END)}
    [dead] = [e for e in entries if isinstance(e, DeadLetter)]
    assert dead.message.value == messages[BAD_KEY_AT].value and dead.message.key == messages[BAD_KEY_AT].key
    assert "cannot convert the record's headers: UnicodeDecodeError" in dead.detail


def _reader_error(bad_at: int, fetch_offset: int = 0) -> Exception:
    """What kafka-python's own record reader raises on a batch of offsets 0-9 with a header key that is not UTF-8
    at ``bad_at``, after handing over the records before it."""
    builder = default_records.DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    for offset in range(10):
        builder.append(offset, 0, None, b"v", [(_NotUtf8("zz") if offset == bad_at else "ok", b"h")])
    reader = Fetcher.PartitionRecords(fetch_offset, TopicPartition("t", 3), MemoryRecords(bytes(builder.build())))
    handed_over: list[int] = []
    with pytest.raises(CorruptRecordError) as raised:
        for _ in range(2):  # the records before it, then the error
            handed_over += [r.offset for r in reader.take(100)]
    assert handed_over == list(range(fetch_offset, bad_at))
    return raised.value


def test_the_rest_of_the_batch_is_unreadable_at_most_so_many_per_fetch() -> None:
    tp, records = unreadable_records(_reader_error(2), most=3)
    assert tp == TopicPartition("t", 3)
    assert [(r.topic, r.partition, r.offset) for r in records] == [("t", 3, 2), ("t", 3, 3), ("t", 3, 4)]
    assert "cannot read offsets 2-9, the rest of their record batch" in records[0].detail
    _, resumed = unreadable_records(_reader_error(2, fetch_offset=5), most=100)  # a seek into the batch
    assert [r.offset for r in resumed] == list(range(5, 10))


def test_an_error_not_raised_by_the_record_reader_is_not_taken_for_one() -> None:
    try:
        raise CorruptRecordError("the broker said so")
    except CorruptRecordError as err:
        assert unreadable_records(err, most=10) is None


def test_recording_a_topic_leaves_unreadable_records_out_and_ends(
    kafka_bootstrap, make_topic, monkeypatch, tmp_path, caplog
) -> None:
    """``stream-cl record`` polled the same kafka-python reader: it spun on the first unreadable record for good."""
    topic = make_topic(1)
    messages = _produce(kafka_bootstrap, topic, monkeypatch)
    path = tmp_path / "t.rec.gz"
    written = record_topic(kafka_bootstrap, topic, path, until_idle_s=1.0)
    readable = [o for o in range(END) if o not in {BAD_KEY_AT, 3, 4, *CRC_BATCH}]
    assert written == len(readable)
    with RecordedSource(path) as source:
        entries = _drain(source, written)
    assert [e.message.value for e in entries] == [messages[o].value for o in readable]
    assert any("offsets 2-4 cannot be read and are not recorded" in r.getMessage() for r in caplog.records)
