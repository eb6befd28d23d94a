"""The checkpointer while checkpoint writes fail: the age metric keeps growing, the next batch retries the
write, and the final checkpoint is tried again instead of re-raising an old failure."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from monitoring.metrics import Metrics
from stream_cl.checkpoint import CheckpointInfo
from stream_cl.checkpointer import Checkpointer
from stream_cl.learner import RunState
from stream_cl.summary import Summary


class Store:
    """Checkpoint writes that fail while ``full`` (a full disk), and otherwise keep the payload."""

    def __init__(self, *, full: bool) -> None:
        self.full = full
        self.attempts = 0
        self.written: list[dict[str, Any]] = []
        self.attempted = threading.Event()

    def write(self, payload: dict[str, Any]) -> CheckpointInfo:
        self.attempts += 1
        self.attempted.set()
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
def test_the_checkpoint_age_keeps_growing_while_every_write_fails(cadence: dict[str, float]) -> None:
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


def test_a_failed_write_is_retried_at_the_next_batch_and_holds_every_record_since_the_last_one_written() -> None:
    metrics = Metrics(CollectorRegistry())
    store = Store(full=True)
    checkpointer = Checkpointer(store, identity={}, every_records=100, metrics=metrics)
    step(checkpointer, 100, 100)
    assert store.attempted.wait(5)
    store.full = False
    time.sleep(0.05)  # the failure is known before the next batch
    step(checkpointer, 101)  # one record: not 100 more, but the failed write is due still
    assert wait_for(lambda: age(metrics) == 0.0)  # written, without waiting for finish
    assert written_offsets(store) == [[["t", 0, 101]]] and store.attempts == 2
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
