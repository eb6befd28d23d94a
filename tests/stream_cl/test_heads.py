"""LevelHeads growth: trained rows and Adam moments kept, zeros for new rows, current LR for new levels."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from stream_cl.heads import LevelHeads, hierarchical_ce


def _trained_heads() -> tuple[LevelHeads, torch.optim.Adam]:
    torch.manual_seed(0)
    heads = LevelHeads(4)
    backbone = torch.nn.Parameter(torch.zeros(1))  # stands for the backbone: the optimizer's first group
    opt = torch.optim.Adam([backbone], lr=0.1)
    heads.grow([3], opt)
    for _ in range(2):
        y, level = torch.tensor([0, 1, 2, 0, 1]), torch.zeros(5, dtype=torch.long)
        loss = hierarchical_ce(heads(torch.randn(5, 4)), y, level)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return heads, opt


def test_growing_a_level_keeps_rows_and_extends_adam_state_with_zeros() -> None:
    heads, opt = _trained_heads()
    old = heads.heads[0]
    old_w, old_state = old.weight.detach().clone(), {k: v.clone() for k, v in opt.state[old.weight].items()}
    assert heads.grow([5], opt)
    new = heads.heads[0]
    assert new.out_features == 5 and torch.equal(new.weight[:3], old_w)
    state = opt.state[new.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == (5, 4)
        assert torch.equal(state[key][:3], old_state[key]) and not old_state[key].eq(0).all()
        assert state[key][3:].eq(0).all()
    assert torch.equal(state["step"], old_state["step"])
    assert opt.state[new.bias]["exp_avg"].shape == (5,)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is new.weight for p in params) and not any(p is old.weight for p in params)
    assert old.weight not in opt.state
    # The grown head keeps training through the same optimizer.
    before = new.weight.detach().clone()
    loss = hierarchical_ce(heads(torch.randn(2, 4)), torch.tensor([4, 3]), torch.zeros(2, dtype=torch.long))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(new.weight, before)


def test_new_level_gets_its_own_group_with_the_current_learning_rate() -> None:
    heads, opt = _trained_heads()
    for group in opt.param_groups:
        group["lr"] = 0.01  # e.g. an adaptive LR lowered it
    assert heads.grow([3, 2], opt)
    assert heads.sizes == [3, 2]
    assert opt.param_groups[-1]["lr"] == 0.01
    assert not heads.grow([3, 2], opt)


def test_hierarchical_ce_scores_each_sample_under_its_own_level() -> None:
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0, 2.0]] * 3)]
    y, level = torch.tensor([0, 2, 1]), torch.tensor([0, 1, 0])
    expected = (
        F.cross_entropy(logits[0][[0, 2]], y[[0, 2]], reduction="sum") + F.cross_entropy(logits[1][[1]], y[[1]])
    ) / 3
    assert hierarchical_ce(logits, y, level).item() == pytest.approx(expected.item())
    weighted = hierarchical_ce(logits, y, level, weight=torch.tensor([0.0, 1.0, 0.0]))
    assert weighted.item() == pytest.approx(F.cross_entropy(logits[1][[1]], y[[1]]).item() / 3)


def test_one_level_loss_equals_the_masked_general_loss() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    weight = torch.rand(6)
    level = torch.zeros(6, dtype=torch.long)
    assert torch.allclose(hierarchical_ce([logits], y, level), F.cross_entropy(logits, y))
    expected = (F.cross_entropy(logits, y, reduction="none") * weight).mean()
    assert torch.allclose(hierarchical_ce([logits], y, level, weight), expected)
    # two levels: each sample scored by its own level's head, averaged over all samples
    fine, level2 = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    y2 = torch.tensor([0, 2, 1, 0, 3, 1])
    manual = (F.cross_entropy(logits[level2 == 0], y2[level2 == 0], reduction="sum")
              + F.cross_entropy(fine[level2 == 1], y2[level2 == 1], reduction="sum")) / 6  # fmt: skip
    assert torch.allclose(hierarchical_ce([logits, fine], y2, level2), manual)


def test_the_flat_loss_learns_exactly_as_the_mean_of_per_sample_losses() -> None:
    """The fused mean changes no gradient bit (the loss value may differ in its last bit: summation order)."""
    torch.manual_seed(1)
    for n, classes in ((1, 2), (20, 10), (37, 100)):
        logits = (torch.randn(n, classes) * 20).requires_grad_()
        y, level = torch.randint(0, classes, (n,)), torch.zeros(n, dtype=torch.long)
        (fused,) = torch.autograd.grad(hierarchical_ce([logits], y, level), logits)
        (per_sample,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="none").mean(), logits)
        assert torch.equal(fused, per_sample)
