"""OnPro's loss terms on hand-computable cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from stream_cl.methods.onpro_losses import (
    EPS,
    class_keys,
    contrast_groups,
    ins_loss,
    ins_similarity,
    mixup_ce,
    proto_loss,
    split_keys,
)


def test_prototype_loss_of_two_identical_views_with_orthogonal_classes() -> None:
    # Two classes on orthogonal unit vectors, both views identical: for each of the 4 prototypes the
    # positive has similarity 1/τ = 2, the two negatives 0, so the loss is log(1 + 2 e^-2).
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss, present, mu = proto_loss(z, z.clone(), torch.tensor([7, 7, 3]), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    assert present.tolist() == [3, 7]
    assert torch.allclose(mu, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_prototype_loss_with_one_class_is_zero() -> None:
    z1, z2 = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    loss, present, mu = proto_loss(z1, z2, torch.full((5,), 4), temperature=0.5)
    assert loss.item() == 0.0
    assert present.tolist() == [4]
    assert torch.allclose(mu, (z1.mean(0) + z2.mean(0)) / 2)  # means of normalised views, not re-normalised


def test_prototype_loss_matches_nt_xent_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    z1, z2 = F.normalize(torch.randn(6, 4, generator=gen), dim=1), F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    keys = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _, _ = proto_loss(z1, z2, keys, temperature=0.5)
    p = F.normalize(torch.stack([z1[keys == c].mean(0) for c in range(3)]), dim=1)
    q = F.normalize(torch.stack([z2[keys == c].mean(0) for c in range(3)]), dim=1)
    protos = torch.cat([p, q])
    expected = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        denom = sum(math.exp(protos[i] @ protos[j] / 0.5) for j in range(6) if j != i)
        expected -= math.log(math.exp(protos[i] @ protos[pos] / 0.5) / denom)
    assert loss.item() == pytest.approx(expected / 6, rel=1e-5)


def _ins_direct(sim: torch.Tensor, groups: list[int], tau: float, stream: bool) -> float:
    """OCM's loss written element by element (spec §1.4a)."""
    n = len(groups)
    total = 0.0
    for i in range(n):
        row = [sim[i, j].item() for j in range(n)]
        top = max(row)
        p = [0.0 if (stream and j == i) else math.exp((row[j] - top) / tau) for j in range(n)]
        denom = sum(p) + EPS
        nll = [-math.log(pj / denom + EPS) for pj in p]
        same = [j for j in range(n) if groups[j] == groups[i]]
        total += 2 * sum(nll[j] for j in same) / (len(same) + EPS) if stream else sum(nll[j] for j in same) / len(same)
        if stream:
            total += nll[(i + n // 2) % n]
    return total / n


@pytest.mark.parametrize("stream", [True, False])
def test_ins_loss_matches_the_direct_formula(stream: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    h = F.normalize(torch.randn(6, 10, generator=gen), dim=1)
    sim = ins_similarity(z, h, offset=3, scale=1.0)
    assert torch.allclose(sim, z @ h[:, 3:7].T + z @ z.T)
    groups = [0, 1, 0, 0, 1, 0]  # rows 0..2 view A, 3..5 view B of the same three images
    loss = ins_loss(sim, torch.tensor(groups), temperature=0.07, stream=stream)
    assert loss.item() == pytest.approx(_ins_direct(sim, groups, 0.07, stream), rel=1e-5)


def test_contrast_groups_separate_views_and_mixtures() -> None:
    a = torch.tensor([5, 5, 5, 6])
    b = torch.tensor([5, 5, 6, 6])
    lam = torch.tensor([0.0, 0.0, 0.3, 0.0])
    g = contrast_groups(a, b, lam, n_views=2).tolist()
    assert len(g) == 8
    assert g[0] == g[1] and g[4] == g[5]  # same class, same view
    assert g[0] != g[4]  # same class, other rotation view
    assert len({g[0], g[2], g[3]}) == 3  # a mixture matches only the identical mixture


def test_keys_are_per_level_and_class() -> None:
    level, y = torch.tensor([0, 1, 1]), torch.tensor([2, 2, 0])
    keys = class_keys(level, y)
    assert len(set(keys.tolist())) == 3
    back_level, back_y = split_keys(keys)
    assert torch.equal(back_level, level) and torch.equal(back_y, y)


def test_mixup_ce_weights_both_labels_per_level() -> None:
    logits = [torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.5, -0.5]])]
    a, b = class_keys(torch.tensor([0]), torch.tensor([2])), class_keys(torch.tensor([1]), torch.tensor([1]))
    loss = mixup_ce(logits, a, b, torch.tensor([0.25]))
    expected = 0.75 * F.cross_entropy(logits[0], torch.tensor([2])) + 0.25 * F.cross_entropy(
        logits[1], torch.tensor([1])
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
