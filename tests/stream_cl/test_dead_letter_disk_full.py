"""A full disk under the dead-letter spool pauses the run loop (backpressure) instead of ending it, and every dead
letter is delivered once space is back."""

from __future__ import annotations

import errno
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers import dlq
from consumers.record import Message, Poll, Position
from consumers.recorded import RecordedSource, write_messages
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.streams import blob_arrays, messages


class _Producer:
    """Acknowledges every dead letter at once, into ``values``."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list, partition: int) -> _Producer:
        self.values.append(value)
        return self

    def get(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


class _Watched(RecordedSource):
    """Counts the polls made while the dead-letter sink pushes back."""

    def __init__(self, path: Path, sink: dlq.KafkaDeadLetterSink) -> None:
        super().__init__(path)
        self.sink, self.polled_under_pressure = sink, 0

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        self.polled_under_pressure += self.sink.backpressure
        return super().poll(timeout_s, max_records)


def test_a_full_dead_letter_disk_pauses_the_run_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = _Producer()
    monkeypatch.setattr(dlq, "new_producer", lambda bootstrap, **options: producer)
    x, y = blob_arrays(n_classes=2, per_class=20)
    bad = [Message(Position("test", 0, 40 + i), 0.0, None, b"{nope%d" % i, ()) for i in range(5)]
    write_messages(tmp_path / "s.rec.gz", [*messages(x, y), *bad])
    sink = dlq.KafkaDeadLetterSink("unused:9092", spool_dir=tmp_path / "spool", retry_s=0.05)
    disk_full = threading.Event()
    disk_full.set()
    put = sink._spool.put

    def put_unless_full(message: Message) -> None:
        if disk_full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        put(message)

    monkeypatch.setattr(sink._spool, "put", put_unless_full)
    pushed_back = threading.Event()

    def free_the_disk_once_pushed_back() -> None:
        deadline = time.monotonic() + 30
        while not sink.backpressure and time.monotonic() < deadline:
            time.sleep(0.01)
        if sink.backpressure:
            pushed_back.set()
            time.sleep(0.3)  # the loop waits meanwhile
        disk_full.clear()

    threading.Thread(target=free_the_disk_once_pushed_back, daemon=True).start()
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=8)
    with sink, _Watched(tmp_path / "s.rec.gz", sink) as source:
        summary, _ = run_stream(
            source, make, Metrics(CollectorRegistry()), RunOptions(progress=False), RunParts(dead_letters=sink)
        )
        deadline = time.monotonic() + 10
        while sink.spooled and time.monotonic() < deadline:
            time.sleep(0.02)
    assert pushed_back.is_set() and source.polled_under_pressure == 0
    assert summary.learned == 40 and summary.dead_letter["bad_json"] == 5
    assert producer.values == [b"{nope%d" % i for i in range(5)]
