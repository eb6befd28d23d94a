"""OnPro's augmentations, batched on the device: OCM rotation views and the stochastic view T.

Random parameters are drawn from a CPU ``torch.Generator`` owned by the method (a few numbers per
image) and moved to the device, so the draws are identical on CPU and CUDA; the image work itself
is a handful of batched tensor ops (``rot90``/``flip``/``affine_grid``/``grid_sample``).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

VIEW_COUNTS = (1, 2, 4, 8, 16)
"""Allowed numbers of rotation views; 16 is OCM/OnPro's full expansion."""

_TURNS = (0, 2, 1, 3)  # rot90 counts of the four global blocks: 0°, 180°, 90°, 270° (OCM order)
_GREY = (0.299, 0.587, 0.114)


def view_blocks(n_views: int) -> list[int]:
    """Which of the 16 OCM blocks ``n_views`` views use, in OCM block order.

    Block ``r = 4·g + i`` is inner variant ``i`` (identity, left half 180°, both halves 180°,
    right half 180°) turned by global rotation ``g`` (0°, 180°, 90°, 270°). Fewer views keep the
    global rotations first: 1 → identity, 2 → 0°/180°, 4 → the four global rotations,
    8 → two inner variants × four rotations.

    >>> view_blocks(4), view_blocks(8)
    ([0, 4, 8, 12], [0, 1, 4, 5, 8, 9, 12, 13])
    """
    if n_views not in VIEW_COUNTS:
        raise ValueError(f"rotations must be one of {VIEW_COUNTS}, got {n_views}")
    n_global = min(n_views, 4)
    n_inner = n_views // n_global
    return [4 * g + i for g in range(n_global) for i in range(n_inner)]


def _inner_variant(x: torch.Tensor, i: int) -> torch.Tensor:
    if i == 0:
        return x
    w = x.shape[-1] // 2
    left, right = x[..., :w], x[..., w:]
    turn = (-2, -1)
    if i == 1:
        return torch.cat([left.flip(turn), right], dim=-1)
    if i == 2:
        return torch.cat([left.flip(turn), right.flip(turn)], dim=-1)
    return torch.cat([left, right.flip(turn)], dim=-1)


def rotation_views(x: torch.Tensor, n_views: int) -> torch.Tensor:
    """Stack ``n_views`` blocks of ``x`` (N, C, H, W) → (n_views·N, C, H, W); block 0 is ``x``.

    Block ``j`` of the output is :func:`view_blocks` ``(n_views)[j]``; callers label its samples
    with view index ``j`` (the pseudo-class offset of OCM).
    """
    blocks = view_blocks(n_views)
    if any(b >= 8 for b in blocks) and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"90° rotation views need square images, got {tuple(x.shape[-2:])}")
    inner = {i: _inner_variant(x, i) for i in sorted({b % 4 for b in blocks})}
    return torch.cat([torch.rot90(inner[b % 4], _TURNS[b // 4], dims=(-2, -1)) for b in blocks])


def random_view(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    flip_p: float = 0.5,
    grey_p: float = 0.25,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """OnPro's view T: horizontal flip → random greyscale → RandomResizedCrop, per image.

    Flip and crop are one affine map sampled with ``grid_sample`` (bilinear, reflection padding,
    output the input size); crop width/height fractions are clamped to 1 instead of re-drawn.
    Greyscale applies to 3-channel inputs only.
    """
    n = x.shape[0]
    u = torch.rand(n, 6, generator=gen, dtype=torch.float64)
    flip = torch.where(u[:, 0] < flip_p, -1.0, 1.0)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 2]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 3]
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx, cy = (2 * u[:, 4] - 1) * (1 - w), (2 * u[:, 5] - 1) * (1 - h)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    theta = theta.to(device=x.device, dtype=torch.float32)
    x = x.float()
    if x.shape[1] == 3:
        grey = torch.einsum("nchw,c->nhw", x, x.new_tensor(_GREY)).unsqueeze(1).expand_as(x)
        x = torch.where((u[:, 1] < grey_p).to(x.device)[:, None, None, None], grey, x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
