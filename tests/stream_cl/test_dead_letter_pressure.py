"""A dead-letter sink that cannot deliver: the loop stops polling while its spool is full (nothing is dropped),
and ``/readyz`` answers 503 while dead letters cannot be delivered."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.record import DeadLetter, Message, Poll, Position
from consumers.recorded import RecordedSource, write_messages
from monitoring.metrics import Metrics
from stream_cl import assemble as assemble_module
from stream_cl.assemble import assemble
from stream_cl.build import build_learner
from stream_cl.config import Config
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.fixtures.procs import free_port
from tests.streams import blob_arrays, messages


class StuckSink:
    """Pushes back (spool full) until ``release`` is set; then takes everything."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sent: list[DeadLetter] = []

    @property
    def backpressure(self) -> bool:
        return not self.release.is_set()

    @property
    def healthy(self) -> bool:
        return self.release.is_set()

    def send(self, dead: DeadLetter) -> None:
        self.sent.append(dead)

    def __enter__(self) -> StuckSink:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Watched(RecordedSource):
    """Fails the test if polled while the sink pushes back."""

    def __init__(self, path: Path, sink: StuckSink) -> None:
        super().__init__(path)
        self.sink, self.polled_under_pressure = sink, 0

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        self.polled_under_pressure += self.sink.backpressure
        return super().poll(timeout_s, max_records)


def _stream(path: Path) -> Path:
    x, y = blob_arrays(n_classes=2, per_class=20)
    bad = [Message(Position("test", 0, 40 + i), 0.0, None, b"{nope", ()) for i in range(5)]
    write_messages(path, [*messages(x, y), *bad])
    return path


def test_a_full_spool_pauses_polling_and_drops_nothing(tmp_path: Path) -> None:
    sink = StuckSink()
    threading.Timer(0.5, sink.release.set).start()
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=8)
    started = time.monotonic()
    with Watched(_stream(tmp_path / "s.rec.gz"), sink) as source:
        summary, _ = run_stream(
            source, make, Metrics(CollectorRegistry()), RunOptions(progress=False), RunParts(dead_letters=sink)
        )
    assert source.polled_under_pressure == 0 and time.monotonic() - started >= 0.5
    assert summary.learned == 40 and len(sink.sent) == 5 == summary.dead_letter["bad_json"]


def test_readyz_is_503_while_dead_letters_cannot_be_delivered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = StuckSink()
    monkeypatch.setattr(assemble_module, "open_dead_letters", lambda *a, **k: sink)
    port = free_port()
    cfg = Config.from_mapping({"source": str(_stream(tmp_path / "s.rec.gz")), "metrics_port": port})

    def readyz() -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status
        except urllib.error.HTTPError as err:
            return err.code

    ready = threading.Event()
    with assemble(cfg, ready):
        ready.set()
        assert readyz() == 503
        sink.release.set()
        assert readyz() == 200
