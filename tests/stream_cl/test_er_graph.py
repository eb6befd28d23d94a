"""The static padded ER step (what ``cuda_graphs=True`` captures on a GPU) learns what the dynamic step learns."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_cl.build import build_learner
from stream_cl.cli import main
from stream_cl.learner import Batch
from stream_cl.methods.common import NON_FINITE_LOSS
from stream_cl.methods.er import ER
from stream_cl.methods.er_graph import StaticReplayStep
from tests import contracts
from tests.stream_cl.test_learners import CHECKS
from tests.streams import write_stream

RAGGED = [10, 7, 10, 3, 10, 1, 10, 10, 6, 10]


def _learner(model: str, shape: tuple[int, ...], dtype: np.dtype, **hparams: object) -> ER:
    return build_learner(
        "er", model, shape, dtype, device=torch.device("cpu"), seed=3, buffer_size=25, width=4,
        hparams={"replay_batch_size": 8, **hparams},
    )  # fmt: skip


def _stream(shape: tuple[int, ...], dtype: np.dtype, hierarchical: bool) -> list[Batch]:
    rng = np.random.default_rng(1)
    out, names = [], ["a", "b", "c", "d", "e"]
    for i, n in enumerate(RAGGED):
        if dtype == np.uint8:
            x = torch.from_numpy(rng.integers(0, 255, size=(n, *shape), dtype=np.uint8))
        else:
            x = torch.from_numpy(rng.normal(size=(n, *shape)).astype(np.float32))
        classes = rng.integers(0, 2 + min(i, 3), size=n)  # classes keep arriving: the heads grow mid-stream
        parents = ["p" if c < 2 else "q" for c in classes]
        if hierarchical:  # every third record labelled only at the parent level
            labels = [
                (p,) if k % 3 == 0 else (p, names[c]) for k, (p, c) in enumerate(zip(parents, classes, strict=True))
            ]
        else:
            labels = [(names[c],) for c in classes]
        if i == 4:
            labels[0] = None  # an unlabelled record is only predicted
        out.append(Batch(x, labels))
    return out


@pytest.mark.parametrize(
    ("model", "shape", "dtype", "hierarchical"),
    [
        ("mlp", (12,), np.dtype(np.float32), False),  # row-independent: one padded static batch
        ("mlp", (12,), np.dtype(np.float32), True),  # two levels: per-level masked CE
        ("resnet18-reduced", (8, 8, 3), np.dtype(np.uint8), False),  # batch-norm: exact shapes
    ],
    ids=["mlp-flat", "mlp-tree", "resnet-bn"],
)
def test_static_step_learns_what_the_dynamic_step_learns(
    model: str, shape: tuple[int, ...], dtype: np.dtype, hierarchical: bool
) -> None:
    def run(**hparams: object) -> tuple[ER, list]:
        learner = _learner(model, shape, dtype, **hparams)  # built just before its run: heads draw from torch's RNG
        trace = []
        for batch in _stream(shape, dtype, hierarchical):
            observation = learner.observe(batch)
            state = {k: v.clone() for k, v in learner.model.state_dict().items()}
            trace.append((observation.stats, observation.prediction, state))
        return learner, trace

    _, dynamic = run()
    static, trace = run(cuda_graphs=True)
    assert static.static_step is not None and not static.static_step.graphs  # CPU: eager
    for (a, predicted, want), (b, static_predicted, got) in zip(dynamic, trace, strict=True):
        assert torch.equal(static_predicted.classes, predicted.classes)  # padded prediction, same classes
        torch.testing.assert_close(static_predicted.confidence, predicted.confidence)
        assert b.n_learned == a.n_learned and b.n_replayed == a.n_replayed
        assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-6)
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    steps = static.static_step._slots
    if model == "mlp":
        assert list(steps) == [(10, 8)]  # every ragged step padded into one static batch
        assert static.model.heads.sizes[-1] >= 3  # the heads grew while the step stayed static
    else:
        assert len(steps) > 1  # batch-norm: one static batch per exact shape


def test_a_non_finite_static_step_is_refused_and_changes_nothing() -> None:
    learner = _learner("resnet18-reduced", (8, 8, 3), np.dtype(np.uint8), cuda_graphs=True)
    learner.observe(Batch(torch.zeros((4, 8, 8, 3), dtype=torch.uint8), [("a",), ("b",)] * 2))
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    step: StaticReplayStep = learner.static_step
    inputs = torch.full((4, 3, 8, 8), 3e38)  # overflows in the first convolution
    value = step(inputs, torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long), 0)
    assert value is None and learner.guard.reason == NON_FINITE_LOSS
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # weights and batch-norm statistics as they were
    value = step(torch.zeros((4, 3, 8, 8)), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long), 0)
    assert value is not None and learner.guard.reason is None


def test_the_static_step_needs_plain_sgd() -> None:
    learner = _learner("mlp", (12,), np.dtype(np.float32))
    momentum = torch.optim.SGD(learner.model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="plain SGD"):
        StaticReplayStep(learner.model, momentum, learner.guard, 8, graphs=True)


def _graphed(seed: int = 0) -> ER:
    return build_learner(
        "er", "resnet18-reduced", contracts.SHAPE, np.dtype(np.uint8), device=torch.device("cpu"),
        seed=seed, buffer_size=20, width=4, hparams={"cuda_graphs": True},
    )  # fmt: skip


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_er_with_the_static_step_passes_the_learner_contract(check) -> None:
    check(_graphed())


def test_er_with_the_static_step_resumes_from_its_state() -> None:
    contracts.check_state_round_trip(_graphed(), _graphed(seed=5))


def test_run_command_takes_the_cuda_graphs_switch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=3, per_class=20, shape=(6,))
    args = ["run", "--source", str(stream), "--method", "er", "--model", "mlp", "--metrics-port", "0"]
    args += ["--no-progress", "--probe-fraction", "0", "--hparam", "cuda_graphs=True"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"records learned\s+60\b", out), out
