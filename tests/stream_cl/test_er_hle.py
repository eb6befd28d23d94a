"""ER-HLE (the HLE code's ER: PL-FMS's loop, reservoir memory) and ER's compute-matched ``iterations``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from buffers.reservoir import ReservoirPolicy
from stream_cl.bench.compute import Compute
from stream_cl.build import build_learner
from stream_cl.learner import Batch


def _learner(method: str = "er-hle", capacity: int = 6, **kw):
    hparams = {"batch_size": 4, "online_iter": 1.5, **kw} if method == "er-hle" else kw
    return build_learner(
        method, "mlp", (8, 8, 3), np.dtype("uint8"), device=torch.device("cpu"), buffer_size=capacity, width=16,
        hparams=hparams,
    )  # fmt: skip


def _batch(n: int, classes: list[tuple[str, ...]], seed: int = 0) -> Batch:
    x = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
    return Batch(x, [classes[i % len(classes)] for i in range(n)])


def test_updates_per_temporary_batch_follow_the_credit_and_memory_is_written_after_them() -> None:
    learner = _learner()
    compute = Compute(learner)
    assert isinstance(learner.buffer.policy, ReservoirPolicy)  # a plain reservoir: no importance eviction
    # B = 4: the temporary batch holds 2 samples; 1.5 updates of credit per sample -> 3 updates per pair.
    obs = learner.observe(_batch(3, [("a",), ("b",)]))
    assert compute.steps == 3 and obs.stats.n_learned == 3
    assert obs.stats.n_replayed == 0, "the first pair's updates see an empty memory: it is written after them"
    assert len(learner.buffer) == 2 and learner.loop.n_waiting() == 1  # the third sample waits for a partner
    obs = learner.observe(_batch(3, [("a",), ("b",)], seed=1))
    # the waiting sample and the first new one make pair 2, the other two pair 3: 2 × 3 more updates,
    # each filling the batch with B/2 = 2 memory samples.
    assert compute.steps == 9 and obs.stats.n_replayed == 6 * 2
    assert len(learner.buffer) == 6 and learner.loop.n_waiting() == 0


def test_reservoir_keeps_the_memory_bounded_and_a_resumed_learner_continues_exactly() -> None:
    learner, other = _learner(capacity=3), _learner(capacity=3)
    for i in range(5):
        learner.observe(_batch(4, [("a",), ("b",), ("c",)], seed=i))
    assert len(learner.buffer) == 3
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    nxt = _batch(3, [("a",), ("c",)], seed=9)
    assert learner.observe(nxt).stats.loss == other.observe(nxt).stats.loss
    probe = _batch(6, [("a",)], seed=10).x
    assert torch.equal(learner.predict(probe).confidence, other.predict(probe).confidence)


def test_lr_decays_per_update_and_resets_when_a_class_appears() -> None:
    learner = _learner(lr=1e-3, online_iter=1.0, lr_decay=0.5)
    learner.observe(_batch(2, [("a",)]))  # two updates after the reset of the new class
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    learner.observe(_batch(2, [("a",)], seed=1))
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**4)
    learner.observe(_batch(2, [("b",)], seed=2))
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    constant = _learner(lr=1e-3)
    constant.observe(_batch(4, [("a",)]))
    assert constant.optimizer.param_groups[0]["lr"] == 1e-3


def test_er_iterations_take_that_many_steps_per_batch_each_with_its_own_replay() -> None:
    plain, matched = _learner("er", capacity=50), _learner("er", capacity=50, iterations=3)
    counts = Compute(plain), Compute(matched)
    for i in range(3):
        batch = _batch(10, [("a",), ("b",)], seed=i)
        plain.observe(batch)
        obs = matched.observe(batch)
    assert [c.steps for c in counts] == [3, 9]
    assert obs.stats.n_learned == 10 and obs.stats.n_replayed == 3 * 10  # a fresh draw of 10 per step
    assert len(matched.buffer) == len(plain.buffer) == 30, "the batch is stored once, not once per step"


@pytest.mark.parametrize(
    "method, bad", [("er-hle", {"batch_size": 3}), ("er-hle", {"lr_decay": 0.0}), ("er", {"iterations": 0})]
)
def test_hyper_parameters_are_validated(method: str, bad: dict) -> None:
    with pytest.raises(ValueError):
        _learner(method, **bad)


def test_compute_counts_optimizer_steps_and_the_cpu_time_of_learning() -> None:
    learner = _learner(capacity=20, online_iter=2.0)
    compute = Compute(learner)
    learner.observe(_batch(4, [("a",), ("b",)]))  # outside a learning block: steps count, time does not
    assert compute.steps == 8 and compute.cpu_seconds == 0.0
    with compute.learning():
        learner.observe(_batch(2, [("a",)], seed=1))
    assert compute.steps == 12 and compute.cpu_seconds > 0.0
