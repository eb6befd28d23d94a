"""The guard every method steps through: non-finite or extreme inputs are refused before anything changes;
non-finite losses, gradients or batch-norm statistics skip the step."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.learner import Prediction
from stream_cl.methods.common import EXTREME_INPUT, NON_FINITE_LOSS, StepGuard
from tests.contracts import same_state


def bn_model() -> tuple[nn.Module, torch.optim.Optimizer, StepGuard]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=0.1), StepGuard(model)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, guard: StepGuard, x: torch.Tensor) -> float | None:
    guard.begin()
    loss = F.cross_entropy(model(x), torch.arange(len(x)) % 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return guard.step(loss, optimizer)


def test_a_non_finite_step_leaves_weights_optimizer_and_batch_norm_as_they_were():
    model, optimizer, guard = bn_model()
    x = torch.randn(16, 4)
    assert train_step(model, optimizer, guard, x) is not None  # Adam now has state to keep
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for extreme in (3e38, 1e30, float("inf")):  # finite float32 too: the running variance overflows
        poisoned = x.clone()
        poisoned[0, 0] = extreme
        assert train_step(model, optimizer, guard, poisoned) is None, extreme
        assert same_state(model.state_dict(), before[0]), "weights and running statistics restored"
        assert same_state(optimizer.state_dict(), before[1])
        assert all(p.grad is None for p in model.parameters())
    loss = train_step(model, optimizer, guard, x)
    assert loss is not None and loss > 0 and not same_state(model.state_dict(), before[0]), "learning goes on"


def test_screen_looks_only_at_rows_to_learn():
    confident = Prediction(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    labels = [("a",), ("b",), None]
    x = torch.ones(3, 2)
    x[1, 0] = 3e38  # squared, it overflows float32
    assert StepGuard().screen(x, confident, labels) == NON_FINITE_LOSS
    assert StepGuard().screen(x, confident, [("a",), None, ("b",)]) is None, "an unlabelled row is only predicted"
    lost = Prediction(confident.classes, torch.tensor([[1.0], [float("nan")], [1.0]]))
    assert StepGuard().screen(torch.ones(3, 2), lost, labels) == NON_FINITE_LOSS


def test_screen_refuses_inputs_far_larger_than_the_usual_ones_after_warm_up():
    confident = Prediction(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    guard, labels = StepGuard(warmup=3), [("a",), ("b",), ("a",)]
    extreme = torch.ones(3, 2)
    extreme[2, 1] = 1e12  # finite, and so is its square
    for scale in (1.0, 2.0, 0.5):
        assert guard.screen(torch.full((3, 2), scale), confident, labels) is None
    assert guard.screen(extreme, confident, labels) == EXTREME_INPUT
    assert guard.screen(torch.full((3, 2), 50.0), confident, labels) is None, "a larger but plausible batch passes"
    state = guard.state_dict()
    resumed = StepGuard(warmup=3)
    resumed.load_state_dict(state)
    assert resumed.screen(extreme, confident, labels) == EXTREME_INPUT, "the usual scale survives a restart"
