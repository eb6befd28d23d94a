"""AutoAugment's CIFAR-10 policy on tensors: each operation on hand-made images, the policy's draws."""

from __future__ import annotations

import pytest
import torch

from stream_cl.methods.autoaugment import CIFAR10_POLICY, OPS, auto_augment, magnitude


def _ramp() -> torch.Tensor:
    """One 3×4×4 image whose pixel values are 10·(row·4 + column) in every channel."""
    return (torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4) * 10).expand(1, 3, 4, 4).contiguous()


def test_pixel_operations_on_hand_made_values() -> None:
    x = torch.tensor([0.0, 100.0, 200.0, 255.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    one = torch.ones(1)
    assert OPS["Invert"](x, one)[0, 0].flatten().tolist() == [255.0, 155.0, 55.0, 0.0]
    assert OPS["Solarize"](x, torch.tensor([150.0]))[0, 0].flatten().tolist() == [0.0, 100.0, 55.0, 0.0]
    # 4 bits kept: steps of 16
    assert OPS["Posterize"](x, torch.tensor([4.0]))[0, 0].flatten().tolist() == [0.0, 96.0, 192.0, 240.0]
    assert OPS["Brightness"](x, torch.tensor([-0.5]))[0, 0].flatten().tolist() == [0.0, 50.0, 100.0, 127.5]
    low = torch.tensor([50.0, 60.0, 70.0, 150.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert OPS["AutoContrast"](low, one)[0, 0].flatten().tolist() == pytest.approx([0.0, 25.5, 51.0, 255.0])
    flat = torch.full((1, 3, 2, 2), 7.0)
    assert torch.equal(OPS["AutoContrast"](flat, one), flat)
    grey = torch.full((1, 3, 2, 2), 80.0)
    assert torch.allclose(OPS["Color"](grey, torch.tensor([0.9])), grey)  # no colour to saturate


def test_equalize_spreads_a_narrow_histogram_like_pil() -> None:
    # values 10, 20, 30, 40, four pixels each: step = (16 - 4) // 255 = 0, so PIL leaves it as is
    x = torch.tensor([10.0, 20.0, 30.0, 40.0]).repeat_interleave(4).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
    assert torch.equal(OPS["Equalize"](x, torch.ones(1)), x)
    # 300 pixels per value: step = (1200 - 300) // 255 = 3, lut = (cumsum + 1) // 3 shifted by one bin
    big = torch.tensor([10.0, 20.0, 30.0, 40.0]).repeat_interleave(300).reshape(1, 1, 30, 40).expand(1, 3, 30, 40)
    out = OPS["Equalize"](big, torch.ones(1))[0, 0].flatten()
    assert sorted(set(out.tolist())) == [0.0, 100.0, 200.0, 255.0]


def test_geometric_operations_move_pixels_and_fill_black() -> None:
    x = _ramp()
    shifted = OPS["TranslateX"](x, torch.tensor([1.0]))[0, 0]
    assert shifted[:, 0].tolist() == [0.0] * 4 and torch.equal(shifted[:, 1:], x[0, 0, :, :3])
    down = OPS["TranslateY"](x, torch.tensor([-2.0]))[0, 0]
    assert torch.equal(down[:2], x[0, 0, 2:]) and down[2:].eq(0).all()
    turned = OPS["Rotate"](x, torch.tensor([90.0]))[0, 0]
    assert torch.equal(turned, x[0, 0].rot90(1)) or torch.equal(turned, x[0, 0].rot90(-1))
    assert torch.equal(OPS["ShearY"](x, torch.zeros(1)), x) and torch.equal(OPS["Rotate"](x, torch.zeros(1)), x)


def test_policy_draws_come_from_the_generator_and_keep_the_pixel_range() -> None:
    x = torch.randint(0, 256, (64, 3, 8, 8), generator=torch.Generator().manual_seed(1)).float()
    a = auto_augment(x, torch.Generator().manual_seed(0))
    b = auto_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 255
    changed = (a != x).flatten(1).any(dim=1).float().mean()
    assert 0.3 < changed < 1.0  # most sub-policies change the image; some (low probabilities) leave it
    assert len(CIFAR10_POLICY) == 25 and {op for pair in CIFAR10_POLICY for op, _, _ in pair} == set(OPS)
    assert magnitude("Posterize", 9, 32) == 4.0 and magnitude("Solarize", 0, 32) == 255.0
    assert magnitude("TranslateX", 9, 32) == pytest.approx(150 / 331 * 32)
