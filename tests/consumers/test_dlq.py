"""Dead-letter sinks against a real broker (tansu): outages, a full spool, a crashed process's spool."""

from __future__ import annotations

import contextlib
import gc
import gzip
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from consumers.dlq import MAX_DETAIL_CHARS, FileDeadLetterSink, KafkaDeadLetterSink
from consumers.kafka import message_from_record
from consumers.record import DeadLetter, Message, Position
from consumers.recorded import RecordedStreamError, read_messages
from consumers.spool import Spool
from tests.fixtures.kafka import RestartableBroker
from tests.fixtures.procs import free_port


@pytest.fixture(autouse=True)
def _collect_leaked_sockets():
    """kafka-python 3.0 leaves the sockets of refused connection attempts (an outage, here on purpose) to the
    garbage collector: collect them now, not during a later test."""
    yield
    gc.collect()


FAST_CLIENT = {"reconnect_backoff_ms": 50, "reconnect_backoff_max_ms": 200}
SEND_BOUND_S = 1.0
"""What the tests allow ``send`` during an outage: loose for a noisy machine, far below the old blocking."""


def _dead(topic: str, offset: int, partition: int = 0) -> DeadLetter:
    message = Message(Position(topic, partition, offset), 1.0, b"k%d" % offset, b"v%d" % offset, (("h", b"x"),))
    return DeadLetter(message, "bad_json", f"at {offset}: " + "e" * MAX_DETAIL_CHARS)


def _sink(bootstrap: str, spool: Path, **kwargs) -> KafkaDeadLetterSink:
    return KafkaDeadLetterSink(
        bootstrap, spool_dir=spool, timeout_s=3.0, retry_s=0.2, client_options=FAST_CLIENT, **kwargs
    )


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _read_dlq(bootstrap: str, topic: str, expect: int) -> dict[int, list[Message]]:
    """The messages of ``topic`` by partition, once ``expect`` have arrived (and a moment more for extras)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    out: dict[int, list[Message]] = {}
    try:
        _wait(lambda: consumer.partitions_for_topic(topic) is not None)
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline, extra_until = time.monotonic() + 20, None
        while time.monotonic() < (extra_until or deadline):
            for tp, records in consumer.poll(timeout_ms=200).items():
                out.setdefault(tp.partition, []).extend(message_from_record(r) for r in records)
            if extra_until is None and sum(map(len, out.values())) >= expect:
                extra_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return out


def _offsets(messages: list[Message]) -> list[int]:
    return [int(dict(m.headers)["source-offset"]) for m in messages]


def _spool_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.glob("*.rec.gz"))


def test_outage_spools_without_blocking_and_delivers_in_order_after(restartable_kafka: RestartableBroker, tmp_path):
    broker, topic, spool = restartable_kafka, f"t-{uuid.uuid4().hex[:10]}", tmp_path / "spool"
    with _sink(broker.bootstrap, spool) as sink:
        sink.send(_dead(topic, 0))
        _wait(lambda: sink.delivered == 1)
        assert sink.healthy and sink.spooled == 0 and _spool_files(spool) == []

        broker.stop()
        for offset in range(1, 8):
            started = time.monotonic()
            sink.send(_dead(topic, offset))
            assert time.monotonic() - started < SEND_BOUND_S
        _wait(lambda: not sink.healthy)
        assert sink.spooled == 7 and len(_spool_files(spool)) == 7
        assert not sink.backpressure
        time.sleep(1.0)  # retries go on failing while the broker is away
        assert not sink.healthy and sink.delivered == 1 and sink.spooled == 7

        broker.start()  # memory storage: the topic starts empty again
        sink.send(_dead(topic, 8))  # newer than the spooled ones: must come after them
        _wait(lambda: sink.spooled == 0 and sink.healthy)
        assert sink.delivered == 9 and _spool_files(spool) == []

    by_partition = _read_dlq(broker.bootstrap, topic + ".dlq", expect=8)
    assert len(by_partition) == 1  # one source partition -> one dead-letter partition
    (messages,) = by_partition.values()
    assert _offsets(messages) == list(range(1, 9))
    for m in messages:
        headers = dict(m.headers)
        offset = int(headers["source-offset"])
        assert (m.key, m.value, m.headers[0]) == (b"k%d" % offset, b"v%d" % offset, ("h", b"x"))
        assert headers["source-topic"] == topic.encode() and headers["source-partition"] == b"0"
        assert headers["reason"] == b"bad_json"
        assert headers["detail"] == _dead(topic, offset).detail[:MAX_DETAIL_CHARS].encode()
        assert len(headers["detail"]) == MAX_DETAIL_CHARS


def test_full_spool_pushes_back_and_drops_nothing(restartable_kafka: RestartableBroker, tmp_path):
    broker, topic, spool = restartable_kafka, f"t-{uuid.uuid4().hex[:10]}", tmp_path / "spool"
    broker.stop()
    with _sink(broker.bootstrap, spool, spool_max_bytes=1500) as sink:
        sent = 0
        while not sink.backpressure:
            sink.send(_dead(topic, sent, partition=sent % 2))
            sent += 1
        assert sent > 1
        for _ in range(3):  # what the caller already polled still goes in: never refused, never dropped
            sink.send(_dead(topic, sent, partition=sent % 2))
            sent += 1
        assert sink.backpressure and sink.spooled == sent == len(_spool_files(spool))

        broker.start()
        _wait(lambda: sink.spooled == 0)
        assert not sink.backpressure and sink.delivered == sent

    by_partition = _read_dlq(broker.bootstrap, topic + ".dlq", expect=sent)
    assert sum(map(len, by_partition.values())) == sent
    for messages in by_partition.values():  # each source partition's dead letters in their order
        partitions = {dict(m.headers)["source-partition"] for m in messages}
        assert len(partitions) == 1
        first = int(partitions.pop())
        assert _offsets(messages) == list(range(first, sent, 2))


_KILLED_SENDER = """
import sys, time
from consumers.dlq import KafkaDeadLetterSink
from tests.consumers.test_dlq import _dead
sink = KafkaDeadLetterSink(sys.argv[1], spool_dir=sys.argv[2], timeout_s=3.0, retry_s=0.2)
for offset in range(5):
    sink.send(_dead(sys.argv[3], offset))
print("sent", flush=True)
time.sleep(600)
"""


def test_spool_of_a_killed_process_is_delivered_at_next_start(kafka_bootstrap, tmp_path):
    topic, spool = f"t-{uuid.uuid4().hex[:10]}", tmp_path / "spool"
    unreachable = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SENDER, unreachable, str(spool), topic],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"sent\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert len(_spool_files(spool)) == 5

    with _sink(kafka_bootstrap, spool) as sink:
        assert sink.spooled == 5
        sink.send(_dead(topic, 5))
        _wait(lambda: sink.spooled == 0)
        assert sink.delivered == 6
    (messages,) = _read_dlq(kafka_bootstrap, topic + ".dlq", expect=6).values()
    assert _offsets(messages) == list(range(6))


def test_a_dead_letter_the_broker_refuses_is_kept_and_the_rest_delivered(kafka_bootstrap, tmp_path):
    topic, spool = f"t-{uuid.uuid4().hex[:10]}", tmp_path / "spool"
    huge = DeadLetter(Message(Position(topic, 0, 1), 0.0, None, b"x" * 5000), "oversized")
    sink = KafkaDeadLetterSink(
        kafka_bootstrap, spool_dir=spool, timeout_s=3.0, client_options={**FAST_CLIENT, "max_request_size": 2000}
    )
    with sink:
        for dead in (_dead(topic, 0), huge, _dead(topic, 2)):
            sink.send(dead)
        _wait(lambda: sink.spooled == 0)
        assert (sink.delivered, sink.rejected) == (2, 1)
    (kept,) = spool.glob("*.rejected")
    assert [m.value for m in read_messages(kept)] == [b"x" * 5000]
    (messages,) = _read_dlq(kafka_bootstrap, topic + ".dlq", expect=2).values()
    assert _offsets(messages) == [0, 2]


def test_close_leaves_undelivered_dead_letters_in_the_spool_within_its_bound(tmp_path):
    spool = tmp_path / "spool"
    unreachable = f"127.0.0.1:{free_port()}"
    sink = KafkaDeadLetterSink(unreachable, spool_dir=spool, timeout_s=0.3, retry_s=0.2, client_options=FAST_CLIENT)
    sink.send(_dead("t", 0))
    started = time.monotonic()
    sink.close(timeout_s=2.0)
    assert time.monotonic() - started < 2.0 + 2.0  # the bound, plus slack for a loaded machine
    with Spool(spool, max_bytes=1) as left:  # released, and the dead letter waits there for the next start
        assert [m.position.offset for _, m in left.oldest(10)] == [0]


def test_file_sink_writes_each_dead_letter_through_and_pushes_back_only_when_the_disk_refuses(tmp_path):
    with FileDeadLetterSink(tmp_path / "dead.rec.gz") as sink:
        sink.send(_dead("t", 3))
        assert (sink.backpressure, sink.healthy, sink.spooled, sink.delivered) == (False, True, 0, 1)
        (m,) = read_messages(tmp_path / "dead.rec.gz")  # readable before close: a kill now loses nothing
    assert dict(m.headers)["source-offset"] == b"3"


def test_file_sink_restarted_on_its_file_appends_after_cutting_a_torn_tail_and_never_overwrites_other_files(tmp_path):
    path = tmp_path / "dead.rec.gz"
    with FileDeadLetterSink(path) as sink:
        sink.send(_dead("t", 0))
        sink.send(_dead("t", 1))
    whole = path.read_bytes()
    torn = gzip.compress(b"a member a kill cut short" * 100)
    path.write_bytes(whole + torn[: len(torn) // 2])
    with FileDeadLetterSink(path) as sink:  # the service started again with the same flags
        sink.send(_dead("t", 2))
        assert sink.delivered == 1
    assert [m.position.offset for m in read_messages(path)] == [0, 1, 2]
    other = tmp_path / "notes.txt"
    for foreign in (b"not a recording", gzip.compress(b"someone else's gzip")):
        other.write_bytes(foreign)
        with pytest.raises(RecordedStreamError, match="not appended to"):
            FileDeadLetterSink(other)
        assert other.read_bytes() == foreign


def test_file_sink_moves_a_file_damaged_mid_way_aside_whole_and_survives_an_outside_truncation(tmp_path):
    path = tmp_path / "dead.rec.gz"
    with FileDeadLetterSink(path) as sink:
        for offset in range(3):
            sink.send(_dead("t", offset))
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # a flipped byte inside dead letter 1
    path.write_bytes(bytes(damaged))
    with FileDeadLetterSink(path) as sink:  # not cut: the intact dead letters after the damage are kept aside
        sink.send(_dead("t", 3))
        (aside,) = tmp_path.glob("dead.rec.gz.damaged-*")
        assert aside.read_bytes() == bytes(damaged)
        assert [m.position.offset for m in read_messages(path)] == [3]
        path.write_bytes(b"")  # logrotate's copytruncate empties it under the writer
        sink.send(_dead("t", 4))
    assert [m.position.offset for m in read_messages(path)] == [4]  # the header came back with it
    with FileDeadLetterSink(os.devnull) as sink:  # a character device: nothing to read back or cut
        sink.send(_dead("t", 5))
        assert sink.delivered == 1


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """A real refusal from the OS: writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_file_sink_holds_what_the_disk_refuses_in_order_and_writes_it_when_space_returns(tmp_path):
    path = tmp_path / "dead.rec.gz"
    rng = np.random.default_rng(0)

    def big(offset: int) -> DeadLetter:  # 16 KiB that gzip cannot shrink: the limit falls inside the third
        message = Message(Position("t", 0, offset), 1.0, None, rng.bytes(16384), ())
        return DeadLetter(message, "bad_json", "junk")

    sink = FileDeadLetterSink(path, retry_s=0.0)
    with _file_size_limit(40_000):
        for offset in range(5):
            sink.send(big(offset))  # never raises
        held = (sink.backpressure, sink.healthy, sink.spooled, sink.delivered, sink.sent)
        on_disk = [m.position.offset for m in read_messages(path)]  # the refused write was cut back off
    assert held == (True, False, 3, 2, 5) and on_disk == [0, 1]
    assert (sink.backpressure, sink.healthy, sink.spooled, sink.delivered) == (False, True, 0, 5)
    sink.close()
    assert [m.position.offset for m in read_messages(path)] == [0, 1, 2, 3, 4]
