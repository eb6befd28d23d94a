"""Hostile recorded files and failing brokers around ``record``, ``replay`` and ``produce``: a frame declaring
millions of headers, a timestamp that cannot be slept to, a message too large for the producer, a broker gone
before or during a send or a recording, and SIGTERM ending ``stream-cl record``. Each is a clear error, a count
or a clean file, never a traceback, a silent loss or gigabytes allocated from a kilobyte file."""

from __future__ import annotations

import errno
import gzip
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

import consumers.capture as capture
from consumers.capture import record_topic
from consumers.producer import KafkaSink, paced, produce_messages
from consumers.record import Message, Position
from consumers.recorded import MAGIC, MAGIC_V1, MAX_HEADERS, RecordedStreamError, read_messages, write_messages
from stream_cl.cli import main
from tests.consumers.test_kafka import _read_topic
from tests.fixtures.kafka import RestartableBroker

ROOT = Path(__file__).resolve().parents[2]
FAST_PRODUCER = {"max_block_ms": 1000, "request_timeout_ms": 1000, "delivery_timeout_ms": 2000, "retries": 0}


def _messages(n: int, stream: str = "s", size: int = 10) -> list[Message]:
    return [Message(Position(stream, 0, i), i / 1000, str(i).encode(), bytes([i % 256]) * size, ()) for i in range(n)]


def test_a_frame_declaring_a_million_headers_is_refused_before_they_are_built(tmp_path: Path) -> None:
    n = 1 << 20  # 8 MiB of header lengths that gzip packs into a few kilobytes; ~200 MB as Python objects
    body = struct.pack("<IqdIIIIB", 0, 0, 0.0, 0, 0, 1, n, 0) + bytes(8 * n) + b"s"
    path = tmp_path / "headers.rec.gz"
    path.write_bytes(gzip.compress(MAGIC + struct.pack("<I", len(body)) + body))
    assert path.stat().st_size < 100_000 and n > MAX_HEADERS
    tracemalloc.start()
    try:
        with pytest.raises(RecordedStreamError, match=f"frame 0 .*header count {n} > {MAX_HEADERS}"):
            list(read_messages(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024


def test_a_version_1_meta_of_half_a_million_headers_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    headers = ",".join(['["a",""]'] * 500_000)
    meta = f'{{"stream":"s","partition":0,"offset":0,"timestamp":0.0,"headers":[{headers}]}}'.encode()
    frame = struct.pack("<I", len(meta)) + meta + struct.pack("<II", 0, 0)
    path = tmp_path / "v1.rec.gz"
    path.write_bytes(gzip.compress(MAGIC_V1 + frame))
    with pytest.raises(RecordedStreamError, match=r"frame 0 .*meta length"):
        list(read_messages(path))


def test_pacing_skips_timestamps_that_are_not_finite() -> None:
    stamps = [0.0, float("inf"), 1.0, float("nan"), 2.0, float("-inf")]
    msgs = [Message(Position("t", 0, i), ts, None, b"") for i, ts in enumerate(stamps)]
    slept: list[float] = []
    assert list(paced(msgs, 1.0, clock=lambda: 0.0, sleep=slept.append)) == msgs
    assert slept == [1.0, 2.0]


def test_replay_counts_a_message_too_large_to_send_and_delivers_the_rest(
    kafka_bootstrap: str, make_topic, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = make_topic(1)
    small = _messages(3)
    huge = Message(Position("s", 0, 3), 0.0, b"big", bytes(17 * 1024 * 1024), ())  # over max_request_size
    write_messages(tmp_path / "s.rec.gz", [*small[:2], huge, small[2]])
    assert main(["replay", str(tmp_path / "s.rec.gz"), "--to", f"kafka://{kafka_bootstrap}/{topic}"]) == 1
    err = capsys.readouterr().err
    assert "3 of 4 sent delivered, 1 failed" in err and "MessageSizeTooLarge" in err and "Traceback" not in err
    assert [(m.key, m.value) for m in _read_topic(kafka_bootstrap, topic, 3)] == [(m.key, m.value) for m in small]


def test_a_broker_gone_before_the_first_send_is_a_connection_error(restartable_kafka: RestartableBroker) -> None:
    def stream() -> Iterator[Message]:
        restartable_kafka.stop()  # after the producer connected, before it learned the topic's partitions
        yield from _messages(3)

    started = time.monotonic()
    with pytest.raises(ConnectionError, match="took no message to t in time: 0 of 0 sent delivered"):
        produce_messages(restartable_kafka.bootstrap, "t", stream(), client_options=FAST_PRODUCER)
    assert time.monotonic() - started < 30


def test_a_broker_gone_mid_record_is_an_error_and_the_file_keeps_what_arrived(
    restartable_kafka: RestartableBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = restartable_kafka
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic("t", 1, 1)])
    admin.close()
    produce_messages(broker.bootstrap, "t", _messages(3000, size=1000))
    copy = capture.message_from_record

    def stop_on_first(record: object) -> Message:
        broker.stop()  # the records fetched so far are written; the rest stay on the broker
        return copy(record)

    monkeypatch.setattr(capture, "message_from_record", stop_on_first)
    path = tmp_path / "t.rec.gz"
    fetch = {"max_partition_fetch_bytes": 64 * 1024, "request_timeout_ms": 2000}
    with pytest.raises(ConnectionError, match=r"t recorded in part \(\d+ messages in .*t\.rec\.gz\)"):
        record_topic(broker.bootstrap, "t", path, until_idle_s=1.0, metadata_timeout_s=2.0, client_options=fetch)
    offsets = [m.position.offset for m in read_messages(path)]  # closed whole: no RecordedStreamError
    assert 0 < len(offsets) < 3000 and offsets == list(range(len(offsets)))


def test_sigterm_ends_record_with_every_fetched_message_in_a_whole_file(
    kafka_bootstrap: str, make_topic, tmp_path: Path
) -> None:
    topic = make_topic(2)
    produce_messages(kafka_bootstrap, topic, _messages(500, size=200))
    out = tmp_path / "t.rec.gz"
    cmd = [sys.executable, "-m", "stream_cl", "record", "--source", f"kafka://{kafka_bootstrap}/{topic}"]
    proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(5)  # the 500 messages arrive within a fetch or two; without --until-idle it records on
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    messages = list(read_messages(out))  # the gzip stream is complete: its tail was not lost
    assert len(messages) == 500 and f"recorded 500 messages from kafka://{kafka_bootstrap}/{topic}" in err
    assert sorted(int(m.key or b"") for m in messages) == list(range(500))


def test_a_full_disk_while_recording_names_the_file_and_what_it_holds(
    kafka_bootstrap: str, make_topic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, _messages(20))
    write = capture.RecordedWriter.write

    def fill_up(self: capture.RecordedWriter, message: Message) -> None:
        if self.count == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, message)

    monkeypatch.setattr(capture.RecordedWriter, "write", fill_up)
    path = tmp_path / "t.rec.gz"
    with pytest.raises(OSError, match=r"t\.rec\.gz: No space left on device after 5 messages") as raised:
        record_topic(kafka_bootstrap, topic, path, until_idle_s=1.0)
    assert raised.value.errno == errno.ENOSPC
    assert [m.position.offset for m in read_messages(path)] == [0, 1, 2, 3, 4]


def test_one_request_in_flight_keeps_retried_batches_in_order(kafka_bootstrap: str) -> None:
    # without idempotence, a retried batch overtakes the ones sent after it when several requests are in flight
    with KafkaSink(kafka_bootstrap, "t", client_options={"max_in_flight_requests_per_connection": 5}) as sink:
        assert sink._producer.config["max_in_flight_requests_per_connection"] == 5  # a setting still wins
    with KafkaSink(kafka_bootstrap, "t") as sink:
        assert sink._producer.config["max_in_flight_requests_per_connection"] == 1
