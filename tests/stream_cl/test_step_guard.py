"""The guard every method steps through: non-finite losses, gradients or batch-norm statistics skip the step."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.learner import Prediction
from stream_cl.methods.common import StepGuard, unsafe_batch
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


def test_unsafe_batch_looks_only_at_rows_to_learn():
    x = torch.ones(3, 2)
    x[1, 0] = 3e38  # squared, it overflows float32
    confident = Prediction(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    assert unsafe_batch(x, confident, [("a",), ("b",), None])
    assert not unsafe_batch(x, confident, [("a",), None, ("b",)]), "an unlabelled row is only predicted"
    x[1, 0] = 1e18  # extreme but its square fits: left to the step's loss and gradient check
    assert not unsafe_batch(x, confident, [("a",), ("b",), None])
    lost = Prediction(confident.classes, torch.tensor([[1.0], [float("nan")], [1.0]]))
    assert unsafe_batch(torch.ones(3, 2), lost, [("a",), ("b",), None])
