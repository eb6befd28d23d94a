"""The run loop's screening: records that cannot be learned become dead letters with a reason, in any batch,
the first record too (the one that would decide the model)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.record import DeadLetter, Message, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.wire import REASONS, encode_binary
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.assemble import assemble
from stream_cl.build import build_learner
from stream_cl.config import Config
from stream_cl.errors import ConfigError
from stream_cl.run import RUN_REASONS, RunOptions, RunParts, run_stream


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


def test_first_records_the_model_cannot_take_are_dead_letters_and_the_next_one_builds_it(tmp_path: Path) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    rows = [
        ("vector", np.ones(4, np.float32), ["a"]),  # resnet18 needs (C, H, W)
        ("4-d", np.zeros((1, 2, 2, 3), np.uint8), ["a"]),  # a stack of images, not one
        *[(f"ok-{i}", image + i, [f"c{i % 2}"]) for i in range(6)],
    ]
    sink = Collected()
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)
    make = partial(build_learner, "er", "resnet18", device=torch.device("cpu"), seed=0, width=4)
    with RecordedSource(_stream(tmp_path / "s.rec.gz", rows)) as source:
        summary, state = run_stream(
            source, make, metrics, RunOptions(batch_size=4, progress=False), RunParts(dead_letters=sink)
        )
    assert [(d.message.position.offset, d.reason) for d in sink.dead] == [
        (0, "unsupported_input"),
        (1, "unsupported_input"),
    ]
    assert "needs image inputs" in sink.dead[0].detail
    assert summary.learned == 6 and summary.dead_letter == {"unsupported_input": 2}
    assert (state.input_shape, state.input_dtype) == ((8, 8, 3), np.uint8)
    assert metrics.registry.get_sample_value("streamcl_dead_letter_total", {"reason": "unsupported_input"}) == 2


def test_an_input_too_large_for_max_parameters_is_a_dead_letter_and_a_restore_past_it_a_config_error(
    tmp_path: Path,
) -> None:
    """A huge first vector would make an MLP of millions of parameters that every later record misfits."""
    rows = [("huge", np.ones(5000, np.float32), ["a"])]  # 5000 x 256 weights in the first layer alone
    rows += [(f"ok-{i}", np.full(4, i, np.float32), [f"c{i % 2}"]) for i in range(5)]
    settings = {"source": str(_stream(tmp_path / "s.rec.gz", rows)), "metrics_port": 0, "no_drift": True}
    settings |= {"probe_fraction": 0, "checkpoint_dir": str(tmp_path / "ckpt"), "max_parameters": 1_000_000}
    with assemble(Config.from_mapping(settings)) as run:
        summary, _ = run_stream(run.source, run.make_learner, run.metrics, RunOptions(progress=False), run.parts)
    assert summary.learned == 5 and summary.dead_letter == {"unsupported_input": 1}
    lowered = Config.from_mapping(settings | {"max_parameters": 1000})  # below the checkpoint's model
    with pytest.raises(ConfigError, match="cannot be restored: mlp for inputs"), assemble(lowered):
        pass


def test_a_width_too_large_for_any_input_is_refused_per_record_and_never_built_at_start(tmp_path: Path) -> None:
    """The start-up check of the hyper-parameters builds the learner on the smallest input, but not a model over
    ``max_parameters`` (10^12 weights here: building it would fail or take the machine's memory)."""
    rows = [(f"r{i}", np.full(4, i, np.float32), ["a"]) for i in range(3)]
    settings = {"source": str(_stream(tmp_path / "s.rec.gz", rows)), "metrics_port": 0, "no_drift": True}
    settings |= {"probe_fraction": 0, "width": 1_000_000}
    with assemble(Config.from_mapping(settings)) as run:
        summary, _ = run_stream(run.source, run.make_learner, run.metrics, RunOptions(progress=False), run.parts)
    assert summary.learned == 0 and summary.dead_letter == {"unsupported_input": 3}
