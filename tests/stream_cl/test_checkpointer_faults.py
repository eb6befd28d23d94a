"""The checkpointer while checkpoint writes fail or are slow: the age metric keeps growing, a failed write is
tried again after a back-off, a slow one never stalls the loop, and the final checkpoint is tried again
instead of re-raising an old failure."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.record import Poll
from consumers.recorded import RecordedSource, write_messages
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.checkpoint import CheckpointInfo
from stream_cl.checkpointer import Checkpointer
from stream_cl.learner import RunState
from stream_cl.run import RunOptions, RunParts, run_stream
from stream_cl.summary import Summary
from tests.stream_cl.test_scaleout_dead_letter_pause import PausedSink
from tests.streams import blob_arrays, messages


class Store:
    """Checkpoint writes that fail while ``full`` (a full disk), hang until ``open`` is set (a slow disk), and
    otherwise keep the payload."""

    def __init__(self, *, full: bool) -> None:
        self.full = full
        self.attempts = 0
        self.attempt_times: list[float] = []
        self.written: list[dict[str, Any]] = []
        self.attempted = threading.Event()
        self.open = threading.Event()
        self.open.set()

    def write(self, payload: dict[str, Any]) -> CheckpointInfo:
        self.attempts += 1
        self.attempt_times.append(time.monotonic())
        self.attempted.set()
        assert self.open.wait(30)
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written.append(payload)
        return CheckpointInfo(len(self.written), Path(f"{len(self.written)}.ckpt"), "digest", 1, time.time())


class Learner:
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(2)}


STATE = RunState(Learner(), (2,), np.dtype(np.float32))


def step(checkpointer: Checkpointer, offset: int, n_records: int = 1) -> None:
    checkpointer.step(STATE, {("t", 0): offset}, n_records, Summary())


def age(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("streamcl_checkpoint_age_seconds")
    assert value is not None
    return value


def wait_for(condition: Callable[[], bool], timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def written_offsets(store: Store) -> list[list]:
    return [payload["offsets"] for payload in store.written]


@pytest.mark.parametrize("cadence", [{"every_seconds": 0.05}, {"every_records": 1}])
def test_the_checkpoint_age_keeps_growing_while_every_write_fails(
    cadence: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Checkpointer, "RETRY_FIRST_S", 0.01)  # several tries within the test
    metrics = Metrics(CollectorRegistry())
    store = Store(full=True)
    checkpointer = Checkpointer(store, identity={}, metrics=metrics, **cadence)
    step(checkpointer, 1)
    first_learned = time.monotonic()
    for offset in range(2, 41):
        time.sleep(0.01)
        step(checkpointer, offset)
        now = time.monotonic()
        assert age(metrics) >= now - first_learned  # counted from the first record learned, never reset
    assert store.attempts > 1 and age(metrics) > 0.35
    with pytest.raises(OSError, match="No space"):
        checkpointer.finish(STATE, Summary())
    assert age(metrics) > 0.35


def test_a_failed_write_is_retried_after_its_back_off_and_holds_every_record_since_the_last_one_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Checkpointer, "RETRY_FIRST_S", 0.3)
    metrics = Metrics(CollectorRegistry())
    store = Store(full=True)
    checkpointer = Checkpointer(store, identity={}, every_records=100, metrics=metrics)
    step(checkpointer, 100, 100)
    assert store.attempted.wait(5)
    store.full = False
    time.sleep(0.05)  # the failure is known before the next batch
    step(checkpointer, 101)  # the failed write is due still, but backing off
    assert not wait_for(lambda: store.attempts > 1, timeout_s=0.1)
    time.sleep(0.25)
    step(checkpointer, 102)  # one record: not 100 more, but the failed write is due still
    assert wait_for(lambda: age(metrics) == 0.0)  # written, without waiting for finish
    assert written_offsets(store) == [[["t", 0, 102]]] and store.attempts == 2
    assert checkpointer.finish(STATE, Summary()) is not None and checkpointer.version == 1


def test_finish_writes_again_after_a_failed_write_instead_of_raising_its_error() -> None:
    store = Store(full=True)
    checkpointer = Checkpointer(store, identity={}, every_records=1)
    step(checkpointer, 1)
    assert store.attempted.wait(5)
    store.full = False  # the disk has room again by the time the service stops
    info = checkpointer.finish(STATE, Summary())
    assert info is not None and info.id == 1 and written_offsets(store) == [[["t", 0, 1]]]


def test_an_idle_checkpointer_reads_zero_once_its_write_is_done() -> None:
    metrics = Metrics(CollectorRegistry())
    store = Store(full=False)
    checkpointer = Checkpointer(store, identity={}, every_records=1, metrics=metrics)
    step(checkpointer, 1)
    # written, though the loop has not looked at the write's outcome yet
    assert wait_for(lambda: age(metrics) == 0.0) and written_offsets(store) == [[["t", 0, 1]]]
    checkpointer.finish(STATE, Summary())


def test_a_full_disk_is_tried_again_after_a_doubling_back_off_capped_at_every_seconds_with_one_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Checkpointer, "RETRY_FIRST_S", 0.02)
    store = Store(full=True)
    checkpointer = Checkpointer(store, identity={}, every_seconds=0.16)
    time.sleep(0.16)  # the first checkpoint is due
    deadline = time.monotonic() + 1.5
    offset = 0
    with caplog.at_level(logging.INFO, logger="stream_cl.checkpoint"):
        while time.monotonic() < deadline:  # a batch every 10 ms; before, each one after a failure tried again
            offset += 1
            step(checkpointer, offset)
            time.sleep(0.01)
    gaps = np.diff(store.attempt_times)
    backoffs = [min(0.02 * 2**i, 0.16) for i in range(len(gaps))]
    assert 6 <= store.attempts <= 12, store.attempt_times
    assert all(gap >= backoff for gap, backoff in zip(gaps, backoffs, strict=True)), gaps
    # capped at every_seconds: no longer doubling (the median: one stall of the loaded machine is not a doubling)
    assert np.median(gaps[4:]) < 0.32, gaps
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(failures) >= store.attempts - 1  # the last may still be unknown
    assert failures[0].exc_info is not None and "trying again in 0.02 s" in failures[0].getMessage()
    assert all(r.exc_info is None and "failed again" in r.getMessage() for r in failures[1:])
    assert f"({len(failures)} in a row)" in failures[-1].getMessage()
    with pytest.raises(OSError, match="No space"):
        checkpointer.finish(STATE, Summary())


def test_a_slow_write_never_stalls_the_loop_and_the_checkpoint_due_meanwhile_follows_it() -> None:
    store = Store(full=False)
    store.open.clear()  # a slow disk: the first write hangs until the test lets it finish
    checkpointer = Checkpointer(store, identity={}, every_records=10)
    step(checkpointer, 10, 10)  # due: the first write starts, and hangs
    assert store.attempted.wait(5)

    def batches() -> None:  # 30 more records: a checkpoint is due three times over while the write hangs
        for offset in range(11, 41):
            step(checkpointer, offset)

    loop = threading.Thread(target=batches, daemon=True)
    loop.start()
    loop.join(5)
    stalled = loop.is_alive()
    store.open.set()  # the write finishes (and a loop stalled on it goes on)
    assert not stalled, "a batch waited for the checkpoint write in flight"
    assert store.attempts == 1  # one write at a time, and none queued

    def idle_turn() -> bool:  # the loop's turns after the write is done take the checkpoint due meanwhile
        checkpointer.tick(STATE, Summary())
        return store.attempts == 2

    assert wait_for(idle_turn)
    checkpointer.finish(STATE, Summary())  # waits for that write; nothing unsaved after it
    assert written_offsets(store) == [[["t", 0, 10]], [["t", 0, 40]]] and store.attempts == 2
    assert checkpointer.version == 2


class _FullAfterFirstBatch(RecordedSource):
    """A recorded stream whose dead-letter spool fills up once its first batch has been polled."""

    def __init__(self, path: Path, sink: PausedSink, full_s: float) -> None:
        super().__init__(path)
        self.sink, self.full_s = sink, full_s

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        poll = super().poll(timeout_s, max_records)
        if len(poll) and self.sink.until < time.monotonic():
            self.sink.until = time.monotonic() + self.full_s
        return poll


def test_a_due_checkpoint_is_written_while_a_full_dead_letter_spool_pauses_the_loop(tmp_path: Path) -> None:
    """The loop polls nothing until the spool drains, but the batch it learned before is saved on time."""
    x, y = blob_arrays(2, 10)
    write_messages(tmp_path / "s.rec.gz", messages(x, y))
    store = Store(full=False)
    sink = PausedSink(0)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0)
    checkpointer = Checkpointer(store, identity={}, every_seconds=0.2)
    with _FullAfterFirstBatch(tmp_path / "s.rec.gz", sink, full_s=2.0) as source:
        run_stream(
            source,
            make,
            Metrics(CollectorRegistry()),
            RunOptions(progress=False, batch_size=20),
            RunParts(dead_letters=sink, checkpointer=checkpointer),
        )
    assert any(at < sink.until for at in store.attempt_times)  # before the spool drained
    assert written_offsets(store)[0] == [["test", 0, 20]]
