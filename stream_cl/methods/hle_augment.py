"""The HLE code's training augmentation, used by its loop (:mod:`stream_cl.methods.hle_loop`):
:func:`augment` (random crop with 4-pixel padding + horizontal flip) and :func:`cutmix` per level group."""

from __future__ import annotations

import numpy as np
import torch


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a float NCHW batch, per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def cutmix(x: torch.Tensor, level: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix inside each level group: returns mixed inputs, partner index and the mixing weight.

    Each group gets a Beta(1, 1) box pasted from a permuted sample of the same level; the returned
    λ (share of the original image) is the count-weighted mean of the groups' λ's, as in the HLE code.
    """
    n, _, h, w = x.shape
    partner = torch.arange(n, device=x.device)
    out = x.clone()
    lams, counts = [], []
    level = level.cpu()  # the groups are host bookkeeping (callers pass a host copy: no device sync)
    for lvl in torch.unique(level).tolist():
        group = torch.nonzero(level == lvl).flatten()
        idx, perm = group.to(x.device), group[torch.randperm(len(group), generator=gen)].to(x.device)
        ratio = float(torch.rand((), generator=gen).sqrt())  # sqrt(1 - λ), λ ~ U(0, 1) = Beta(1, 1)
        ch, cw = int(h * ratio), int(w * ratio)
        cy, cx = int(torch.randint(0, h, (), generator=gen)), int(torch.randint(0, w, (), generator=gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        out[idx, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        partner[idx] = perm
        lams.append(1.0 - (y1 - y0) * (x1 - x0) / (h * w))
        counts.append(len(idx))
    return out, partner, float(np.average(lams, weights=counts))
