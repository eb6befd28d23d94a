"""OnPro's rotation views, stochastic view T and APF sampling."""

from __future__ import annotations

import math

import pytest
import torch

from stream_cl.methods.onpro_apf import (
    allocate,
    apf_batch,
    pair_probabilities,
    sample_beta,
    targeted_mixup,
    uniform_mixup,
)
from stream_cl.methods.onpro_augment import random_view, rotation_views, view_blocks


def image() -> torch.Tensor:
    return torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)


def test_sixteen_views_follow_ocm_block_order() -> None:
    x = image()
    views = rotation_views(x, 16).view(16, 2, 1, 4, 4)
    left, right = x[..., :2], x[..., 2:]
    inner = [
        x,
        torch.cat([left.flip(-1, -2), right], -1),
        torch.cat([left.flip(-1, -2), right.flip(-1, -2)], -1),
        torch.cat([left, right.flip(-1, -2)], -1),
    ]
    for g, turns in enumerate((0, 2, 1, 3)):  # 0°, 180°, 90°, 270°
        for i in range(4):
            assert torch.equal(views[4 * g + i], torch.rot90(inner[i], turns, dims=(-2, -1))), (g, i)
    assert torch.equal(views[0], x)


@pytest.mark.parametrize(
    ("n", "blocks"),
    [(1, [0]), (2, [0, 4]), (4, [0, 4, 8, 12]), (8, [0, 1, 4, 5, 8, 9, 12, 13]), (16, list(range(16)))],
)
def test_view_subsets_are_blocks_of_the_full_expansion(n: int, blocks: list[int]) -> None:
    assert view_blocks(n) == blocks
    full = rotation_views(image(), 16).view(16, 2, 1, 4, 4)
    assert torch.equal(rotation_views(image(), n).view(n, 2, 1, 4, 4), full[blocks])


def test_bad_view_counts_and_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="rotations"):
        view_blocks(3)
    with pytest.raises(ValueError, match="square"):
        rotation_views(torch.zeros(1, 1, 4, 6), 4)


def test_random_view_identity_flip_and_grey_cases() -> None:
    x = torch.rand(3, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(random_view(x, gen, flip_p=0.0, grey_p=0.0, scale=(1, 1), ratio=(1, 1)), x, atol=1e-5)
    assert torch.allclose(
        random_view(x, gen, flip_p=1.0, grey_p=0.0, scale=(1, 1), ratio=(1, 1)), x.flip(-1), atol=1e-5
    )
    grey = random_view(x, gen, flip_p=0.0, grey_p=1.0, scale=(1, 1), ratio=(1, 1))
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(grey, expected[:, None].expand_as(x), atol=1e-5)


def test_random_view_is_deterministic_under_the_generator_and_varies_per_image() -> None:
    x = torch.rand(1, 3, 16, 16).expand(4, -1, -1, -1)
    a = random_view(x, torch.Generator().manual_seed(3))
    b = random_view(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == x.shape
    assert not torch.allclose(a[0], a[1])


def test_apf_pair_probabilities_are_softmax_of_inverse_distance() -> None:
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    pairs, probs = pair_probabilities(mu)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]  # itertools.combinations / pdist order
    inv = torch.tensor([1.0, 0.5, 1 / math.sqrt(5)])
    assert torch.allclose(probs, torch.softmax(inv, 0))


def test_allocate_rounds_and_sums_to_total() -> None:
    gen = torch.Generator().manual_seed(0)
    assert allocate(torch.tensor([0.5, 0.25, 0.25]), 4, gen).tolist() == [2, 1, 1]
    for total in range(1, 12):
        counts = allocate(torch.tensor([0.3, 0.3, 0.2, 0.2]), total, gen)
        assert counts.sum().item() == total and (counts >= 0).all()


def test_beta_sampler_moments() -> None:
    draws = sample_beta(0.4, 20000, torch.Generator().manual_seed(0))
    assert ((draws > 0) & (draws < 1)).all()
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    assert draws.var().item() == pytest.approx(0.16 / (0.64 * 1.8), abs=0.01)  # αβ / ((α+β)²(α+β+1))


def constant_pool(classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One 1×2×2 image per class whose pixels equal the class key, so mixtures are readable."""
    keys = torch.tensor(classes)
    return keys.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), keys


def test_targeted_mixup_favours_close_prototypes_and_mixes_pair_members() -> None:
    pool_x, pool_keys = constant_pool([0, 0, 1, 1, 2, 2])
    mu_keys = torch.tensor([0, 1, 2])
    mu = torch.tensor([[0.0, 0.0], [0.05, 0.0], [3.0, 3.0]])  # classes 0 and 1 nearly coincide
    out = targeted_mixup(pool_x, pool_keys, mu_keys, mu, 50, torch.Generator().manual_seed(0), p=1.0, alpha=0.4)
    assert out is not None and len(out.x) == 50
    assert set(out.a.tolist()) == {0} and set(out.b[out.lam > 0].tolist()) <= {1}
    expected = (1 - out.lam) * out.a.float() + out.lam * out.b.float()
    assert torch.allclose(out.x[:, 0, 0, 0], expected, atol=1e-6)


def test_targeted_mixup_replaces_classes_missing_from_the_pool() -> None:
    pool_x, pool_keys = constant_pool([1, 1, 2])
    mu = torch.tensor([[0.0], [0.1], [5.0]])
    out = targeted_mixup(pool_x, pool_keys, torch.tensor([0, 1, 2]), mu, 20, torch.Generator(), p=0.0, alpha=0.4)
    assert out is not None and set(out.a.tolist()) <= {1, 2} and (out.lam == 0).all()
    assert torch.equal(out.x[:, 0, 0, 0], out.a.float())


def test_uniform_mixup_extremes() -> None:
    x, keys = constant_pool([0, 1, 2, 3])
    same = uniform_mixup(x, keys, torch.Generator(), p=0.0, lam_max=0.6)
    assert torch.equal(same.x, x) and torch.equal(same.b, keys) and (same.lam == 0).all()
    mixed = uniform_mixup(x, keys, torch.Generator().manual_seed(1), p=1.0, lam_max=0.6)
    assert ((mixed.lam > 0) & (mixed.lam < 0.6)).all()
    expected = (1 - mixed.lam) * keys.float() + mixed.lam * mixed.b.float()
    assert torch.allclose(mixed.x[:, 0, 0, 0], expected, atol=1e-6)


def test_apf_batch_splits_uniform_and_targeted_parts() -> None:
    rx, rkeys = constant_pool([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    mu = torch.tensor([[0.0], [0.1], [5.0]])
    out = apf_batch(
        rx,
        rkeys,
        rx,
        rkeys,
        torch.tensor([0, 1, 2]),
        mu,
        torch.Generator(),
        base_rate=0.8,
        p=0.0,
        alpha=0.4,
        lam_max=0.6,
    )
    assert len(out.x) == 10 and (out.lam == 0).all()
    assert set(out.a[8:].tolist()) <= {0, 1}  # the 2 targeted samples come from the closest pair
