"""PL-FMS losses and memory wiring: per-sample CE, parent pseudo-labels, ancestor targets, eviction hook."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from buffers.balanced import LargestClassPolicy
from buffers.memory import MemoryStore
from buffers.store import ReplayStore
from stream_cl.methods.pl_fms_parts import ImportanceScores
from stream_cl.precision import full_precision


def per_sample_ce(logits: list[torch.Tensor], y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (float32) of each sample under its own level's head (0 for samples of no level).

    Every head scores every row and a ``where`` keeps each row's own level: no boolean indexing, so no
    host sync per level (rows of other levels get class 0 as a stand-in target, then are dropped).
    """
    out = torch.zeros(len(y), device=y.device)
    with full_precision(*logits):
        for lvl, out_l in enumerate(logits):
            own = level == lvl
            ce = F.cross_entropy(out_l.float(), torch.where(own, y, 0), reduction="none")
            out = torch.where(own, ce, out)
    return out


def parent_pseudo_loss(logits: list[torch.Tensor], level: torch.Tensor, tau: float, lambda_u: float) -> torch.Tensor:
    """Per sample: ``lambda_u · CE(parent head, its argmax)`` for level-l samples (l >= 1) whose parent
    head (l - 1) is confident (max softmax > ``tau``) and whose own head has > 1 output; else 0 (float32,
    computed for every row and selected with ``where``: no host sync)."""
    out = torch.zeros(len(level), device=level.device)
    with full_precision(*logits):
        for lvl in range(1, len(logits)):
            if logits[lvl].shape[1] <= 1:
                continue
            parent = logits[lvl - 1].float()
            conf, target = parent.detach().softmax(dim=1).max(dim=1)
            ce = F.cross_entropy(parent, target, reduction="none")
            out = torch.where((level == lvl) & (conf > tau), lambda_u * ce, out)
    return out


def ancestor_targets(
    parent_maps: Sequence[np.ndarray], y: torch.Tensor, level: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(level, class) of each sample's ancestors, one level up at a time (level -1 where none)."""
    out, lvl, cls = [], level, y
    for depth in range(len(parent_maps) - 1, 0, -1):
        mask = lvl == depth
        if mask.any():
            parents = torch.from_numpy(parent_maps[depth]).to(y.device)
            cls, lvl = cls.clone(), lvl.clone()
            cls[mask], lvl[mask] = parents[cls[mask]], depth - 1
            out.append((torch.where(mask, lvl, -1), cls))
    return out


def attach_importance_policy(buffer: ReplayStore, scores: ImportanceScores, seed: int) -> None:
    """Make the buffer evict the least important sample of the most populated class.

    Raises
    ------
    ValueError
        For a store that already holds samples under another policy, or is not in process.
    """
    policy = getattr(buffer, "policy", None)
    if isinstance(policy, LargestClassPolicy) and policy.admit == "always":
        policy.victim = scores.victim
    elif isinstance(buffer, MemoryStore) and len(buffer) == 0:
        buffer.policy = LargestClassPolicy(buffer.capacity, admit="always", victim=scores.victim, seed=seed)
    else:
        raise ValueError("pl-fms needs an empty MemoryStore or a store with LargestClassPolicy(admit='always')")
