"""OnPro's loss terms: OCM instance-wise contrast (stream "_n" and replay "_uni"), the OPE
prototype loss, and mixup cross-entropy over hierarchical heads.

Classes are identified by a *key* ``level · KEY_STRIDE + y`` so that prototypes, pairs and
contrastive labels of hierarchical streams are per (level, class); flat streams have level 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from stream_cl.heads import hierarchical_ce
from stream_cl.precision import full_precision, masked_min

KEY_STRIDE = 1 << 32
EPS = 1e-8  # as in the OCM/OnPro code: inside the log and the normaliser


def class_keys(level: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One int64 key per (level, class)."""
    return level * KEY_STRIDE + y


def split_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`class_keys`: (level, y)."""
    return keys // KEY_STRIDE, keys % KEY_STRIDE


def keys_by_level(keys: torch.Tensor, parent_maps: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Per level k of the label tree, each row's class key at level k: its own class where it is labelled
    at k, its ancestor at k where it is labelled deeper, -1 where it is labelled above k.

    ``parent_maps[k][c]`` is the parent (at level k - 1) of class c at level k, as
    :meth:`~stream_cl.labels.LabelTree.parent_maps` gives them. On a flat tree this is ``[keys]``.
    """
    level, y = split_keys(keys)
    out = []
    for k in range(len(parent_maps) - 1, -1, -1):
        at = level == k
        out.append(torch.where(at, class_keys(level, y), -1))
        if k and len(parent_maps[k]):
            parents = torch.as_tensor(parent_maps[k], device=keys.device)
            y = torch.where(at, parents[torch.where(at, y, 0)], y)
            level = torch.where(at, k - 1, level)
    return out[::-1]


def contrast_groups(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, n_views: int) -> torch.Tensor:
    """Contrastive label ids of ``n_views`` stacked rotation blocks of samples labelled (a, b, λ).

    Two rows share a label iff they are the same rotation view of the same mixture (unmixed
    samples have ``b = a``, ``λ = 0``), i.e. OCM's ``y + view·C`` extended to mixed samples.
    """
    n = a.shape[0]
    view = torch.arange(n_views, device=a.device).repeat_interleave(n)
    rows = torch.stack([a.repeat(n_views), b.repeat(n_views), view], 1).double()
    rows = torch.cat([rows, lam.double().repeat(n_views)[:, None]], 1)
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def ins_similarity(z: torch.Tensor, h: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    """OCM similarity ``scale · (z h[:, s:s+d]ᵀ + z zᵀ)`` of normalised projections z and features h, in float32."""
    with full_precision(z):
        z = z.float()
        return scale * (z @ h.float()[:, offset : offset + z.shape[1]].T + z @ z.T)


def ins_loss(sim: torch.Tensor, groups: torch.Tensor, *, temperature: float, stream: bool) -> torch.Tensor:
    """OCM contrastive loss over rows ``[A; B]`` (two views, row i and i + N/2 the same image).

    ``stream=True`` is OCM's "_n" variant (self-similarity removed from the denominator, plus the
    explicit view-pair term); ``False`` is the replay "_uni" variant. ``groups`` labels all N rows.
    """
    n = sim.shape[0]
    with full_precision(sim):  # EPS and exp(-2/τ) underflow in float16: 0 · log(0) would make the loss NaN
        sim = sim.float()
        logits = (sim - sim.max(dim=1, keepdim=True).values.detach()) / temperature
        p = logits.exp()
        if stream:
            p = p.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), 0.0)
        nll = -torch.log(p / (p.sum(dim=1, keepdim=True) + EPS) + EPS)
        same = (groups[:, None] == groups[None, :]).float()
        supervised = (same / (same.sum(dim=1, keepdim=True) + EPS) * nll).sum() / n
        if not stream:
            return supervised
        rows = torch.arange(n, device=sim.device)
        return nll[rows, (rows + n // 2) % n].sum() / n + 2 * supervised


def proto_loss(
    z1: torch.Tensor, z2: torch.Tensor, keys: torch.Tensor, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OPE: NT-Xent over the class-mean prototypes of two views; also APF's class means.

    Returns ``(loss, class keys present, μ)`` with μ = (mean z1 + mean z2) / 2 per class
    (means of normalised projections, not re-normalised, detached), all in float32. One class gives loss 0.
    """
    present, mean1, mean2 = class_means(z1, z2, keys)
    k = present.shape[0]
    with full_precision(z1):  # under autocast the matmul would return float16, which cannot hold the mask
        protos = F.normalize(torch.cat([mean1, mean2]), dim=1)
        self_pairs = torch.eye(2 * k, dtype=torch.bool, device=z1.device)
        sim = protos @ protos.T / temperature
        sim = sim.masked_fill(self_pairs, masked_min(sim.dtype))
        target = (torch.arange(2 * k, device=z1.device) + k) % (2 * k)
        return F.cross_entropy(sim, target), present, ((mean1 + mean2) / 2).detach()


def class_means(
    z1: torch.Tensor, z2: torch.Tensor, keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(class keys present, mean of z1, mean of z2)`` per class, in float32."""
    present, inverse = torch.unique(keys, return_inverse=True)
    with full_precision(z1):
        counts = torch.bincount(inverse, minlength=present.shape[0]).to(torch.float32)[:, None]
        z1, z2 = z1.float(), z2.float()
        mean1 = z1.new_zeros(present.shape[0], z1.shape[1]).index_add_(0, inverse, z1) / counts
        mean2 = z2.new_zeros(present.shape[0], z2.shape[1]).index_add_(0, inverse, z2) / counts
    return present, mean1, mean2


def mixup_ce(logits: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(1/m) Σ (1 − λ) CE(·, a) + λ CE(·, b), each term under its own level's head."""
    (la, ya), (lb, yb) = split_keys(a), split_keys(b)
    return hierarchical_ce(logits, ya, la, weight=1 - lam) + hierarchical_ce(logits, yb, lb, weight=lam)
