"""AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019) on a batch of image tensors.

PL-FMS's official training transform is crop + flip + AutoAugment (the CIFAR-10 policy on CIFAR).
torchvision is only in the ``bench`` extra, not a runtime dependency, and its AutoAugment works on
one image at a time; so the 13 operations this policy uses (AutoAugment's 14 but ShearX) are written
here as batched tensor ops, on the device the batch lives on, with every random draw from the
caller's generator (resumable, reproducible). Each image gets one of the 25 sub-policies uniformly;
each of its two operations is applied with its probability, at its magnitude on the usual 10-bin
scale, with a random sign where the operation is signed. Geometric operations sample the nearest
pixel and fill with black.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# (operation, probability, magnitude bin) pairs; None: the operation has no magnitude.
CIFAR10_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
BINS = 10
SIGNED = {"ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def magnitude(op: str, bin_: int, size: int) -> float:
    """The magnitude of ``op`` at ``bin_`` (0..9) for images ``size`` pixels wide (or high)."""
    frac = bin_ / (BINS - 1)
    if op == "ShearY":
        return 0.3 * frac
    if op in ("TranslateX", "TranslateY"):
        return 150.0 / 331.0 * size * frac
    if op == "Rotate":
        return 30.0 * frac
    if op == "Posterize":  # bits kept: 8 down to 4
        return float(8 - round(bin_ / ((BINS - 1) / 4)))
    if op == "Solarize":  # threshold: 255 down to 0
        return 255.0 * (1.0 - frac)
    return 0.9 * frac  # Brightness, Color, Contrast, Sharpness: factor 1 ± magnitude


def auto_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply the CIFAR-10 policy to float NCHW images with RGB pixel values in [0, 255]."""
    n, _, h, w = x.shape
    names = list(OPS)
    table = [[names.index(op) for op, _, _ in pair] for pair in CIFAR10_POLICY]
    op_id = torch.tensor(table)
    prob = torch.tensor([[p for _, p, _ in pair] for pair in CIFAR10_POLICY])
    mag = torch.tensor(
        [[magnitude(op, b or 0, w if op.endswith("X") else h) for op, _, b in pair] for pair in CIFAR10_POLICY]
    )
    signed = torch.tensor([[op in SIGNED for op, _, _ in pair] for pair in CIFAR10_POLICY])
    policy = torch.randint(len(CIFAR10_POLICY), (n,), generator=gen)
    hit = torch.rand(n, 2, generator=gen) < prob[policy]
    sign = torch.where(signed[policy] & (torch.rand(n, 2, generator=gen) < 0.5), -1.0, 1.0)
    mags = mag[policy] * sign
    out = x.clone()
    for stage in range(2):
        ops = op_id[policy, stage]
        for k in torch.unique(ops[hit[:, stage]]).tolist():
            rows = torch.nonzero(hit[:, stage] & (ops == k)).flatten()
            idx = rows.to(x.device)
            out[idx] = OPS[names[k]](out[idx], mags[rows, stage].to(x.device)).clamp_(0.0, 255.0)
    return out


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Sample each output pixel centre ``(u, v)`` at ``matrix @ (u, v, 1)`` (pixel units), nearest, black fill."""
    n, _, h, w = x.shape
    v, u = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
        torch.arange(w, device=x.device, dtype=x.dtype) + 0.5,
        indexing="ij",
    )
    points = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(1, -1, 3)
    src = points @ matrix.to(x.dtype).transpose(1, 2)  # (n, h·w, 2)
    grid = torch.stack([src[..., 0] * 2 / w - 1, src[..., 1] * 2 / h - 1], dim=-1).reshape(n, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _matrix(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)


def _shear_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    a = _matrix(len(x), x.device)
    a[:, 1, 0] = m
    return _affine(x, a)


def _translate_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    a = _matrix(len(x), x.device)
    a[:, 0, 2] = -m.round()
    return _affine(x, a)


def _translate_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    a = _matrix(len(x), x.device)
    a[:, 1, 2] = -m.round()
    return _affine(x, a)


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise by ``degrees`` about the image centre."""
    _, _, h, w = x.shape
    t = degrees * (math.pi / 180.0)
    cos, sin = t.cos(), t.sin()
    cx, cy = w / 2, h / 2
    a = torch.stack(
        [
            torch.stack([cos, -sin, cx - cos * cx + sin * cy], dim=1),
            torch.stack([sin, cos, cy - sin * cx - cos * cy], dim=1),
        ],
        dim=1,
    )
    return _affine(x, a)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.reshape(-1, 1, 1, 1)
    return f * x + (1.0 - f) * degenerate


def _brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), 1.0 + m)


def _color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grey(x).expand_as(x), 1.0 + m)


def _contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), 1.0 + m)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with a smoothed image (3×3 kernel, centre weight 5 of 13); border pixels stay as they are."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, 1.0 + m)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = (2.0 ** (8.0 - bits)).reshape(-1, 1, 1, 1)
    return torch.floor(x / step) * step


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= threshold.reshape(-1, 1, 1, 1), 255.0 - x, x)


def _autocontrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to [0, 255]; a constant channel stays as it is."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, 1.0, 255.0 / (high - low).clamp_min(1e-6))
    return (x - torch.where(flat, 0.0, low)) * scale


def _equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel (the PIL/torchvision look-up table)."""
    n, c, h, w = x.shape
    values = x.round().clamp(0, 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, values, torch.ones_like(values, dtype=torch.float))
    last = hist.gather(1, values.amax(dim=1, keepdim=True))  # count of the highest value present
    step = torch.div(hist.sum(dim=1, keepdim=True) - last, 255, rounding_mode="floor")
    lut = torch.div(
        hist.cumsum(dim=1) + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor"
    )
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], dim=1).clamp(0, 255)
    out = lut.gather(1, values)
    return torch.where(step > 0, out, values.float()).reshape(n, c, h, w)


def _invert(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


OPS = {
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
}
