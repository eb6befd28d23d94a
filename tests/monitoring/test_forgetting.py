"""Forgetting in real time: on a class-incremental stream, old classes are forgotten without replay, less with it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.monitoring.streams import class_incremental_stream

PER_TASK = 400
OLD = ("c0", "c1")  # task 0's classes: they never appear again


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return class_incremental_stream(tmp_path_factory.mktemp("ci") / "ci.rec.gz", tasks=3, per_task=PER_TASK)


def old_class_forgetting(metrics: Metrics) -> float:
    values = [metrics.registry.get_sample_value("streamcl_class_forgetting", {"level": "0", "class": c}) for c in OLD]
    assert None not in values, "per-class forgetting not published"
    return sum(values) / len(values)


def learn(stream: Path, replay_batch_size: int) -> tuple[float, float, float]:
    """Old classes' forgetting after task 0 and at the end, and the level-0 forgetting gauge at the end."""
    metrics = Metrics(CollectorRegistry())
    probe = ProbeSet(fraction=0.1, per_class=50, min_samples=15)  # this short stream holds out 18 records of c0
    make = partial(
        build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, buffer_size=200,
        hparams={"replay_batch_size": replay_batch_size},
    )  # fmt: skip
    with RecordedSource(stream) as source:
        _, state = run_stream(source, make, metrics, RunOptions(progress=False, max_records=PER_TASK), RunParts(probe))
        after_task0 = old_class_forgetting(metrics)
        summary, _ = run_stream(
            source, make, metrics, RunOptions(progress=False, probe_every=100), RunParts(probe), state=state
        )
    assert summary.forgetting_by_level["0"] == metrics.registry.get_sample_value("streamcl_forgetting", {"level": "0"})
    return after_task0, old_class_forgetting(metrics), summary.forgetting_by_level["0"]


def test_forgetting_rises_without_replay_and_less_with_it(stream: Path) -> None:
    before, after, level = learn(stream, replay_batch_size=0)
    assert before < 0.1, "task 0 was just learned: nothing forgotten yet"
    assert after > 0.5, "without replay the old classes are forgotten"
    assert level > 0.3
    _, replayed, replayed_level = learn(stream, replay_batch_size=10)
    assert replayed < after - 0.3
    assert replayed_level < level
