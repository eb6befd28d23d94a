"""The run loop's screening: records that cannot be learned become dead letters with a reason, in any batch."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from consumers.record import DeadLetter, Message, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.wire import encode_binary
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, RunParts, run_stream


class Collected:
    backpressure = False
    healthy = True

    def __init__(self) -> None:
        self.dead: list[DeadLetter] = []

    def send(self, dead: DeadLetter) -> None:
        self.dead.append(dead)


def _stream(path: Path, rows: list[tuple[str, np.ndarray, list[str]]]) -> Path:
    messages = []
    for offset, (sample_id, x, label) in enumerate(rows):
        value, headers = encode_binary(sample_id, x, label)
        messages.append(Message(Position("s", 0, offset), float(offset), None, value, tuple(headers)))
    write_messages(path, messages)
    return path


def test_conflicting_parents_in_one_batch_and_later_are_dead_letters_not_learned(tmp_path: Path) -> None:
    v = np.ones(4, np.float32)
    rows = [
        ("ok-1", v, ["animal", "dog"]),
        ("same-batch", v, ["vehicle", "dog"]),  # dog's parent was claimed by ok-1 in this very batch
        ("wide", np.ones(5, np.float32), ["animal", "cat"]),  # wrong shape
        ("ok-2", v, ["vehicle", "car"]),
        ("later", v, ["vehicle", "dog"]),  # the tree knows dog under animal by now
        ("ok-3", v, ["animal", "dog"]),
    ]
    sink = Collected()
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0)
    with RecordedSource(_stream(tmp_path / "s.rec.gz", rows)) as source:
        summary, state = run_stream(
            source,
            make,
            Metrics(CollectorRegistry()),
            RunOptions(batch_size=4, progress=False),
            RunParts(ProbeSet(fraction=0.0), dead_letters=sink),
        )
    reasons = {d.message.position.offset: d.reason for d in sink.dead}
    assert reasons == {1: "label_conflict", 2: "shape_mismatch", 4: "label_conflict"}
    assert summary.learned == 3 and summary.dead_letter == {"label_conflict": 2, "shape_mismatch": 1}
    tree = state.learner.labels
    assert tree.path(1, tree.lookup(("animal", "dog"))[1]) == ("animal", "dog")
    assert tree.sizes == [2, 2]
