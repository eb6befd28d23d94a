"""A dead-letter spool whose disk is full: ``put`` leaves nothing behind, and the sink holds dead letters in
memory, pushes back and reports unhealthy instead of raising, then spools and delivers them once space is back."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from consumers import dlq
from consumers.record import DeadLetter, Message, Position
from consumers.recorded import read_messages
from consumers.spool import Spool


def _message(offset: int, size: int = 2) -> Message:
    return Message(Position("t", 0, offset), 0.0, None, b"v%d" % offset + b"-" * size)


def _wait(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_put_beyond_the_file_size_limit_raises_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (set in a child process, so the test run keeps its own) makes the write fail as on a full disk."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        from consumers.record import Message, Position
        from consumers.spool import Spool

        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        with Spool({str(tmp_path)!r}, max_bytes=1 << 20) as spool:
            try:
                spool.put(Message(Position("t", 0, 0), 0.0, None, bytes(128 * 1024)))
            except OSError as err:
                print("raised", err.errno)
            spool.put(Message(Position("t", 0, 1), 0.0, None, b"small"))
            print("kept", len(spool), spool.bytes > 0)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split("\n")[:2] == [f"raised {errno.EFBIG}", "kept 1 True"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["000000000001.rec.gz"]


class _Disk:
    """Makes the sink's spool writes fail with ENOSPC while ``full`` is True."""

    def __init__(self, sink: dlq.KafkaDeadLetterSink, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        put = sink._spool.put

        def put_unless_full(message: Message) -> None:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            put(message)

        monkeypatch.setattr(sink._spool, "put", put_unless_full)


class _Producer:
    """Acknowledges every send into ``topic_log``, or fails each send with ``error`` while it is set."""

    def __init__(self, topic_log: list[bytes]) -> None:
        self.topic_log = topic_log
        self.error: Exception | None = None

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list, partition: int) -> _Producer:
        if self.error is not None:
            raise self.error
        self.topic_log.append(value)
        return self

    def get(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> _Producer:
    fake = _Producer([])
    monkeypatch.setattr(dlq, "new_producer", lambda bootstrap, **options: fake)
    return fake


def test_a_full_disk_holds_dead_letters_pushes_back_and_delivers_them_in_order_once_space_is_back(
    tmp_path: Path, producer: _Producer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sink = dlq.KafkaDeadLetterSink("unused:9092", spool_dir=tmp_path, retry_s=0.05)
    disk = _Disk(sink, monkeypatch)
    with sink, caplog.at_level(logging.ERROR, logger="consumers.dlq"):
        sink.send(DeadLetter(_message(0), "bad_json"))
        _wait(lambda: sink.delivered == 1)
        disk.full = True
        for offset in (1, 2, 3):
            sink.send(DeadLetter(_message(offset), "bad_json"))  # neither raises nor drops
        assert (sink.backpressure, sink.healthy, sink.spooled, sink.sent) == (True, False, 3, 4)
        time.sleep(0.2)  # the sender retries the disk meanwhile; still full
        assert (sink.backpressure, sink.healthy, sink.delivered) == (True, False, 1)
        disk.full = False
        _wait(lambda: sink.delivered == 4)
        assert (sink.backpressure, sink.healthy, sink.spooled) == (False, True, 0)
    assert producer.topic_log == [b"v%d--" % i for i in range(4)]
    assert len([r for r in caplog.records if "cannot be written" in r.getMessage()]) == 1  # once per outage
    assert not list(tmp_path.glob("*.tmp"))


def test_close_writes_held_dead_letters_to_the_spool_for_the_next_start(
    tmp_path: Path, producer: _Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer.error = ConnectionError("broker down")
    sink = dlq.KafkaDeadLetterSink("unused:9092", spool_dir=tmp_path, retry_s=60)  # no retry before close
    disk = _Disk(sink, monkeypatch)
    disk.full = True
    sink.send(DeadLetter(_message(0), "bad_json"))
    sink.send(DeadLetter(_message(1), "bad_json"))
    disk.full = False
    sink.close(timeout_s=5)
    left = sorted(tmp_path.glob("*.rec.gz"))
    assert [next(read_messages(path)).value for path in left] == [b"v0--", b"v1--"]
    with Spool(tmp_path, max_bytes=1 << 20) as again:
        assert len(again) == 2
