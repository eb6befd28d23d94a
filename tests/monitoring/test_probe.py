"""The probe set (held-out samples, per-class best accuracy, forgetting) and the per-class series cap."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.monitoring.streams import class_incremental_stream

NAMES = "abc"


def lookup(path: tuple[str, ...]) -> tuple[int, int]:
    return (0, NAMES.index(path[0])) if path[0] in NAMES else (-1, -1)


def predict_all(cls: int):
    return lambda x: np.full((len(x), 1), cls)


def test_holds_out_a_stable_fraction() -> None:
    probe = ProbeSet(fraction=0.1)
    held = [probe.holds_out(f"id-{i}") for i in range(20000)]
    assert 0.09 < np.mean(held) < 0.11
    assert held == [ProbeSet(fraction=0.1).holds_out(f"id-{i}") for i in range(20000)]
    assert not any(ProbeSet(fraction=0.0).holds_out(f"id-{i}") for i in range(1000))


def test_per_class_cap_and_forgetting() -> None:
    probe = ProbeSet(fraction=1.0, per_class=3)
    for i in range(10):
        probe.add(np.full(2, i, dtype=np.float32), ("a",))
    probe.add(np.zeros(2, dtype=np.float32), ("b",))
    probe.add(np.zeros(2, dtype=np.float32), ("zz",))  # not learned yet: skipped
    assert len(probe) == 5
    first = probe.evaluate(predict_all(0), lookup)
    assert first.class_accuracy == {("a",): 1.0, ("b",): 0.0}
    assert first.level_forgetting == {0: 0.0}
    second = probe.evaluate(predict_all(1), lookup)
    # b has 1 probe sample, under min_samples (capped at per_class, 3): its best is not updated, so no forgetting
    assert second.class_forgetting == {("a",): 1.0} and ("b",) not in probe.best
    assert second.level_forgetting == {0: 1.0} and second.level_accuracy == {0: 0.5}


def test_state_round_trip_through_a_weights_only_checkpoint() -> None:
    probe = ProbeSet(fraction=1.0, per_class=2, seed=3)
    for i in range(5):
        probe.add(np.full(2, i, dtype=np.float32), ("a",))
    probe.evaluate(predict_all(0), lookup)
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)
    buffer.seek(0)
    restored = ProbeSet(fraction=1.0, per_class=2, seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.best == probe.best and len(restored) == len(probe)
    assert restored.evaluate(predict_all(1), lookup).class_forgetting == {("a",): 1.0}
    probe.add(np.full(2, 7, dtype=np.float32), ("a",))  # the reservoir continues identically
    restored.add(np.full(2, 7, dtype=np.float32), ("a",))
    assert [x.tolist() for x in probe._samples[("a",)]] == [x.tolist() for x in restored._samples[("a",)]]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fraction"):
        ProbeSet(fraction=1.5)
    with pytest.raises(ValueError, match="per_class"):
        ProbeSet(per_class=0)


def test_class_series_are_capped(tmp_path: Path) -> None:
    stream = class_incremental_stream(tmp_path / "ci.rec.gz", tasks=3, per_task=100)
    metrics = Metrics(CollectorRegistry(), max_class_series=2)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0)
    with RecordedSource(stream) as source:
        summary, _ = run_stream(source, make, metrics, RunOptions(progress=False), RunParts(ProbeSet(fraction=0.1)))
    assert summary.classes_seen == 6
    for name in ("streamcl_class_accuracy", "streamcl_class_forgetting", "streamcl_buffer_class_samples"):
        series = [s for f in metrics.registry.collect() for s in f.samples if s.name == name]
        assert 1 <= len(series) <= 2, name
    assert metrics.registry.get_sample_value("streamcl_accuracy", {"level": "0"}) is not None
