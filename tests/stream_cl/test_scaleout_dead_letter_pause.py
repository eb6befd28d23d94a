"""A group worker paused by a full dead-letter spool still makes every group step (with no records): its peers
go on learning, a stop is agreed, and the collectives' timeout never fails the group while it waits."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry

from consumers.record import DeadLetter, Message, Poll, Position
from consumers.recorded import RecordedSource, write_messages
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.group import model_sha256, process_group
from stream_cl.learner import RunState
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.fixtures.procs import free_port
from tests.stream_cl.test_scaleout import RecordingGroup
from tests.streams import blob_arrays, messages

COLLECTIVE_TIMEOUT = timedelta(seconds=20)
"""Long enough for freshly spawned workers on a loaded machine to reach their first collectives."""
PAUSE_S = 25.0
"""Longer than the collective timeout: a peer waiting for the paused worker in a collective would fail."""
POLL_S = 0.4
"""Rank 0's wait per poll (as a Kafka poll waits for records): its 150 records take 6 s, all in the pause."""
STOP_AFTER_S = 1.0
"""When rank 1 is asked to stop, counted from the first group step: rank 0 has learned then, and its stream
lasts over 5 s more."""
BAD = 3


class PausedSink:
    """A dead-letter sink whose spool is full (backpressure) for ``pause_s`` seconds from its creation."""

    def __init__(self, pause_s: float) -> None:
        self.until = time.monotonic() + pause_s
        self.sent: list[DeadLetter] = []

    @property
    def backpressure(self) -> bool:
        return time.monotonic() < self.until

    @property
    def healthy(self) -> bool:
        return not self.backpressure

    def send(self, dead: DeadLetter) -> None:
        self.sent.append(dead)


class Paced(RecordedSource):
    """A recorded stream polled as a Kafka topic is: each poll waits ``wait_s``; counts polls under backpressure."""

    def __init__(self, path: Path, sink: PausedSink, wait_s: float) -> None:
        super().__init__(path)
        self.sink, self.wait_s, self.polled_under_pressure = sink, wait_s, 0

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        self.polled_under_pressure += self.sink.backpressure
        time.sleep(self.wait_s)
        return super().poll(timeout_s, max_records)


class PauseRecordingGroup(RecordingGroup):
    """Records, besides the model after every group step, whether this worker's sink was still pushing back then
    (it was all turn long: the pause only ends). With ``stop_after_s``, sets ``stop`` that long after the first
    group step (as SIGTERM does), however long the workers took to start."""

    def __init__(self, *args, sink: PausedSink, stop_after_s: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sink, self.paused = sink, []
        self.stop, self.stop_after_s = threading.Event(), stop_after_s

    def finish_step(self, state: RunState) -> None:
        super().finish_step(state)
        self.paused.append(self.sink.backpressure)
        if self.stop_after_s is not None and self.steps == 1:
            threading.Timer(self.stop_after_s, self.stop.set).start()


def _paused_worker(rank: int, port: int, tmp: Path, pause_s: float, stop_after_s: float | None) -> None:
    """Rank 0 learns 150 records of c0-c2, slowly; rank 1's sink pushes back for ``pause_s``, then rank 1 learns
    its 40 records of c0 and c3 and dead-letters its 3 bad ones. With ``stop_after_s``, rank 1 is asked to stop
    that long after the first group step (as SIGTERM does)."""
    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{port}"
    with process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=COLLECTIVE_TIMEOUT):
        x, y = blob_arrays(n_classes=4, per_class=50, shape=(8,))
        keep = y < 3 if rank == 0 else np.isin(y, [0, 3]) & (np.arange(len(y)) % 50 < 20)
        stream = messages(x[keep], y[keep])
        if rank == 1:
            stream += [Message(Position("test", 0, len(stream) + i), 0.0, None, b"{nope", ()) for i in range(BAD)]
        path = tmp / f"stream-{rank}.rec.gz"
        write_messages(path, stream)
        sink = PausedSink(pause_s if rank == 1 else 0.0)
        stop_after = stop_after_s if rank == 1 else None
        group = PauseRecordingGroup(rank, 2, torch.device("cpu"), sink=sink, stop_after_s=stop_after)
        learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=rank, width=16, buffer_size=50)
        with Paced(path, sink, POLL_S if rank == 0 else 0.0) as source:
            summary, state = run_stream(
                source,
                group.wrap(learner),
                Metrics(CollectorRegistry()),
                RunOptions(batch_size=10, progress=False),
                RunParts(dead_letters=sink, lockstep=group),
                stop=group.stop,
            )
        summary = group.summarize(summary, state.learner)
        result = {
            "steps": group.record,
            "paused": group.paused,
            "polled_under_pressure": source.polled_under_pressure,
            "sent": len(sink.sent),
            "dead_letter": summary.dead_letter,
            "learned": summary.learned,
            "workers": summary.workers,
            "end": model_sha256(state.learner),
        }
        (tmp / f"paused-{rank}.json").write_text(json.dumps(result))


def run_group(worker: Callable[..., None], *args: object, within_s: float = 120.0) -> None:
    """Run ``worker`` as a group of two; fails (instead of hanging) unless the group finishes within ``within_s``."""
    context = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + within_s
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the group hung"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def test_a_worker_paused_by_dead_letter_backpressure_keeps_the_group_learning_and_then_learns_its_records(
    tmp_path: Path,
) -> None:
    run_group(_paused_worker, free_port(), tmp_path, PAUSE_S, None)
    zero, one = (json.loads((tmp_path / f"paused-{r}.json").read_text()) for r in (0, 1))
    assert zero["steps"] == one["steps"]  # one model after every group step, the paused worker's included
    # the group stepped on rank 0's records while rank 1 was paused (longer than the collective timeout) ...
    assert sum(one["paused"]) >= 5, one["paused"]
    assert one["polled_under_pressure"] == 0  # ... and rank 1 read nothing meanwhile
    # after the pause rank 1 learned its records and dead-lettered its bad ones, in the group
    assert [w["learned"] for w in zero["workers"]] == [150, 40]
    assert zero["learned"] == one["learned"] == 190
    assert one["sent"] == BAD and zero["dead_letter"] == {"bad_json": BAD}
    assert zero["end"] == one["end"] != ""


def test_a_stop_asked_of_a_paused_worker_is_agreed_by_the_group(tmp_path: Path) -> None:
    run_group(_paused_worker, free_port(), tmp_path, float("inf"), STOP_AFTER_S)
    zero, one = (json.loads((tmp_path / f"paused-{r}.json").read_text()) for r in (0, 1))
    assert zero["steps"] == one["steps"] and all(one["paused"])
    assert one["polled_under_pressure"] == 0 and one["sent"] == 0
    # both stopped together, rank 0 before the end of its stream, with one model
    assert [w["learned"] for w in zero["workers"]] == [zero["learned"], 0] and 0 < zero["learned"] < 150
    assert zero["end"] == one["end"]
