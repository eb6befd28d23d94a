"""OnPro through the Learner contract: task bookkeeping, hierarchical labels, APF steps, resume, CLI."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_cl.assemble import check_hparams
from stream_cl.build import build_learner
from stream_cl.cli import main
from stream_cl.config import parse_hparam
from stream_cl.errors import ConfigError
from stream_cl.learner import Batch
from stream_cl.methods.onpro import OnPro
from tests.streams import write_stream


def make(seed: int = 0, **hparams) -> OnPro:
    hp = {"rotations": 4, "replay_cap": 8, **hparams}
    return build_learner(
        "onpro", "resnet18-reduced", (8, 8, 3), np.dtype(np.uint8), device=torch.device("cpu"),
        seed=seed, buffer_size=30, width=4, hparams=hp,
    )  # fmt: skip


def batches(classes: list[list[object]], seed: int = 0) -> list[Batch]:
    """One batch of 10 random images per entry; labels cycle through the entry's label paths."""
    rng = np.random.default_rng(seed)
    out = []
    for labels in classes:
        x = torch.from_numpy(rng.integers(0, 255, size=(10, 8, 8, 3), dtype=np.uint8))
        out.append(Batch(x, [labels[i % len(labels)] for i in range(10)]))
    return out


FLAT = [[("a",), ("b",)]] * 3 + [[("c",), ("d",)]] * 4


def test_a_new_class_after_the_grace_period_opens_a_task() -> None:
    learner = make(task_grace=2)
    tasks = [(learner.observe(b), learner.task)[1] for b in batches(FLAT)]
    assert tasks == [0, 0, 0, 1, 1, 1, 1]
    joined = make(task_grace=5)
    assert [(joined.observe(b), joined.task)[1] for b in batches(FLAT)] == [0, 0, 0, 0, 0, 0, 0]


def test_replay_batch_size_and_apf_after_task_zero() -> None:
    learner = make(task_grace=1, replay_cap=8, replay_per_class=1)
    stats = [learner.observe(b).stats for b in batches(FLAT)]
    assert stats[0].n_replayed == 0  # nothing stored before the first step
    assert stats[1].n_replayed == 8  # task 0: min(cap, buffer) for L_seen
    assert stats[3].n_replayed == 4  # task 1: min(cap, per_class · 4 classes seen)
    assert learner.mu is not None and set(learner.mu_keys.tolist()) <= {0, 1, 2, 3}
    assert all(s.loss is not None and math.isfinite(s.loss) for s in stats)


def test_replay_can_be_switched_off() -> None:
    learner = make(task_grace=1, replay_cap=0)
    stats = [learner.observe(b).stats for b in batches(FLAT)]
    assert all(s.n_replayed == 0 and math.isfinite(s.loss) for s in stats)
    assert learner.task == 1 and learner.mu is None


def test_hierarchical_labels_get_per_level_heads_and_prototypes() -> None:
    paths = [[("animal",), ("animal", "dog"), ("vehicle", "car")]] * 3 + [[("animal", "cat"), ("vehicle",)]] * 4
    learner = make(task_grace=1)
    for batch in batches(paths):
        obs = learner.observe(batch)
        assert math.isfinite(obs.stats.loss)
    assert learner.labels.sizes == [2, 3]
    assert learner.model.heads.sizes == [2, 3]
    levels = (learner.mu_keys // (1 << 32)).tolist()
    assert set(levels) <= {0, 1} and 1 in levels
    pred = learner.predict(batches(paths, seed=1)[0].x)
    assert pred.classes.shape == (10, 2)


def test_resume_from_state_continues_identically() -> None:
    stream = batches(FLAT)
    original = make(task_grace=2)
    for batch in stream[:4]:
        original.observe(batch)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    resumed = make(seed=9, task_grace=2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert (resumed.task, resumed.steps) == (original.task, original.steps)
    for batch in stream[4:]:
        a, b = original.observe(batch), resumed.observe(batch)
        assert a.stats.loss == pytest.approx(b.stats.loss, rel=1e-5)
        assert torch.equal(a.prediction.classes, b.prediction.classes)


def test_same_seed_gives_the_same_losses() -> None:
    first = [make().observe(b).stats.loss for b in batches(FLAT[:2])]
    second = [make().observe(b).stats.loss for b in batches(FLAT[:2])]
    assert first == second


@pytest.mark.parametrize(
    ("key", "value"), [("rotations", 3), ("lr", 0.0), ("mixup_p", 1.5), ("proj_dim", 33), ("replay_cap", -1)]
)
def test_bad_hyper_parameters_raise(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        make(**{key: value})


def test_feature_vectors_are_rejected() -> None:
    learner = build_learner("onpro", "mlp", (6,), np.dtype(np.float32), device=torch.device("cpu"), width=16)
    with pytest.raises(ValueError, match="image inputs"):
        learner.observe(Batch(torch.zeros(2, 6), [("a",), ("b",)]))


def test_hparam_parsing_and_checking() -> None:
    assert parse_hparam("rotations=4") == ("rotations", 4)
    assert parse_hparam("lr=5e-4") == ("lr", 5e-4)
    assert parse_hparam("amp=false") == ("amp", False)
    assert parse_hparam("apf_pool=none") == ("apf_pool", None)
    assert parse_hparam("name=x") == ("name", "x")
    check_hparams("onpro", {"rotations": 4, "replay_cap": 8})
    with pytest.raises(ConfigError, match="bogus"):
        check_hparams("onpro", {"bogus": 1})


def test_run_command_with_onpro_hparams(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=3, per_class=20, shape=(8, 8, 3), images=True)
    common = ["run", "--source", str(stream), "--method", "onpro", "--model", "resnet18-reduced", "--width", "4"]
    common += ["--metrics-port", "0", "--no-progress", "--probe-fraction", "0"]
    assert main([*common, "--hparam", "rotations=2", "--hparam", "replay_cap=8"]) == 0
    assert main([*common, "--hparam", "bogus=1"]) == 2
    assert "unknown hyper-parameter(s) bogus for method onpro" in capsys.readouterr().err


def test_iterations_take_that_many_steps_per_batch_each_with_its_own_replay_draw() -> None:
    once, thrice = make(task_grace=1, replay_per_class=1), make(task_grace=1, replay_per_class=1, iterations=3)
    stats = [(once.observe(b).stats, thrice.observe(b).stats) for b in batches(FLAT)]
    assert [s.n_replayed for _, s in stats] == [3 * s.n_replayed for s, _ in stats] == [0, 24, 24, 12, 12, 12, 12]
    assert all(s.n_learned == t.n_learned == 10 for s, t in stats) and len(thrice.buffer) == len(once.buffer) == 30
    assert (once.steps, once.task) == (thrice.steps, thrice.task) == (7, 1)  # task bookkeeping counts batches
    assert not all(torch.equal(a, b) for a, b in zip(once.model.parameters(), thrice.model.parameters(), strict=True))
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        make(iterations=0)
