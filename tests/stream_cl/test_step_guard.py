"""The guard every method steps through: non-finite or extreme inputs are refused before anything changes;
non-finite losses, gradients or batch-norm statistics skip the step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.learner import Prediction
from stream_cl.methods.common import EXTREME_INPUT, NON_FINITE_LOSS, StepGuard, clear_grads, optimizer_step
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


def test_gradients_finite_one_by_one_but_overflowing_together_are_refused():
    weights = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer, guard = torch.optim.SGD(weights, lr=0.1), StepGuard()
    guard.begin()
    for w in weights:
        w.grad = torch.full((1,), 1.5e19)  # each squared norm is finite in float32, their sum is not
    assert guard.step(torch.tensor(1.0), optimizer) is None and guard.reason == NON_FINITE_LOSS
    assert all(w.grad is None and w.item() == 0.0 for w in weights), "refused: no step, gradients dropped"
    guard.begin()
    for w in weights:
        w.grad = torch.full((1,), 1e19)
    assert guard.step(torch.tensor(1.0), optimizer) == 1.0
    assert all(w.item() == pytest.approx(-1e18, rel=1e-6) for w in weights), "finite together: stepped"


def sgd_twins(**settings) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
    """Two identical models with a head added as a second parameter group (as grown heads are), and their SGDs."""
    models, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1, **settings)
        optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
        models.append(model)
        optimizers.append(optimizer)
    return models, optimizers


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, step) -> None:
    torch.manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        clear_grads(optimizer)
        F.cross_entropy(model(x), y).backward()
        step(optimizer)


def test_plain_sgd_steps_directly_to_exactly_the_weights_sgd_step_gives():
    (direct, reference), (direct_opt, reference_opt) = sgd_twins()
    run_steps(direct, direct_opt, optimizer_step)
    run_steps(reference, reference_opt, torch.optim.SGD.step)
    for a, b in zip(direct.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), "bit for bit, each group at its own learning rate"
    assert not torch.equal(direct[0].weight, sgd_twins()[0][0][0].weight), "the steps moved the weights"
    assert same_state(direct_opt.state_dict(), reference_opt.state_dict())


def test_sgd_with_momentum_steps_through_the_optimizer():
    (direct, reference), (direct_opt, reference_opt) = sgd_twins(momentum=0.9)
    run_steps(direct, direct_opt, optimizer_step)
    run_steps(reference, reference_opt, torch.optim.SGD.step)
    assert len(direct_opt.state) == 4, "momentum buffers kept, as optimizer.step() keeps them"
    assert same_state(direct.state_dict(), reference.state_dict())
    assert same_state(direct_opt.state_dict(), reference_opt.state_dict())


def test_a_step_hook_is_honoured():
    (model, _), (optimizer, _) = sgd_twins()
    calls = []
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    run_steps(model, optimizer, optimizer_step)
    assert len(calls) == 5
