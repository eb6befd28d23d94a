"""The on-disk spool behind the Kafka dead-letter sink, and the sink's retry path with a fake producer."""

from __future__ import annotations

import time

import pytest
from kafka.errors import KafkaConnectionError

from consumers import dlq
from consumers.record import DeadLetter, Message, Position
from consumers.recorded import read_messages
from consumers.spool import Spool


def _message(offset: int) -> Message:
    return Message(Position("t", 0, offset), 0.0, None, b"v%d" % offset)


def test_entries_come_back_in_order_and_survive_a_new_spool(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        for offset in range(4):
            spool.put(_message(offset))
        spool.remove(1)
    (tmp_path / "000000000009.rec.gz.tmp").write_bytes(b"half written")

    with Spool(tmp_path, max_bytes=1 << 20) as again:
        assert [m.position.offset for _, m in again.oldest(10)] == [1, 2, 3]
        again.put(_message(4))
        assert [m.position.offset for _, m in again.oldest(10)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_set_aside_entry_is_never_overwritten_by_a_later_one(tmp_path):
    for offset in (1, 2):  # one entry set aside per process: the spool is empty again in between
        with Spool(tmp_path, max_bytes=1 << 20) as spool:
            spool.put(_message(offset))
            spool.remove(1, keep_as_rejected=True)
    kept = sorted(tmp_path.glob("*.rejected"))
    assert len(kept) == 2
    assert sorted(read_messages(path).__next__().position.offset for path in kept) == [1, 2]


def test_bound_is_reported_never_enforced(tmp_path):
    with Spool(tmp_path, max_bytes=1) as spool:
        spool.put(_message(0))
        spool.put(_message(1))
        assert spool.full and len(spool) == 2
        spool.remove(2)
        assert not spool.full and spool.bytes == 0


def test_unreadable_entry_is_reported_and_kept_aside(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.put(_message(0))
        ((entry, _),) = spool.oldest(1)
        entry.path.write_bytes(b"not a recorded stream")
        assert spool.oldest(1) == [(entry, None)]
        spool.remove(1, keep_as_rejected=True)
        assert len(spool) == 0
    assert [p.name for p in tmp_path.glob("*.rejected")] == [entry.path.name + ".rejected"]


def test_one_directory_one_spool(tmp_path):
    with Spool(tmp_path, max_bytes=1), pytest.raises(RuntimeError, match="in use"):
        Spool(tmp_path, max_bytes=1)
    Spool(tmp_path, max_bytes=1).close()


class _Ack:
    def __init__(self, error: Exception | None) -> None:
        self._error = error

    def get(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error


class _FakeProducer:
    """Acknowledges sends into ``topic_log`` until its ``fail_from``-th send; from then on the connection is lost."""

    def __init__(self, topic_log: list[bytes], fail_from: int | None) -> None:
        self._log, self._fail_from, self._sends = topic_log, fail_from, 0

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def send(self, topic, value, key, headers, partition) -> _Ack:
        self._sends += 1
        if self._fail_from is not None and self._sends >= self._fail_from:
            return _Ack(KafkaConnectionError("connection lost"))
        self._log.append(value)
        return _Ack(None)

    def close(self, timeout: float) -> None:
        pass


def test_half_failed_batch_keeps_its_acknowledged_start_and_retries_the_rest(tmp_path, monkeypatch):
    topic_log: list[bytes] = []
    producers = iter([_FakeProducer(topic_log, fail_from=3), None, _FakeProducer(topic_log, fail_from=None)])

    def new_producer(bootstrap: str, **options: object) -> _FakeProducer:
        producer = next(producers)
        if producer is None:
            raise RuntimeError("unexpected client failure")  # the sender thread must survive it
        return producer

    monkeypatch.setattr(dlq, "new_producer", new_producer)
    sink = dlq.KafkaDeadLetterSink("unused:9092", spool_dir=tmp_path, retry_s=0.05)
    with sink:
        for offset in range(5):
            sink.send(DeadLetter(_message(offset), "bad_json"))
        deadline = time.monotonic() + 10
        while sink.spooled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (sink.spooled, sink.delivered, sink.healthy) == (0, 5, True)
    assert topic_log == [b"v%d" % i for i in range(5)]
