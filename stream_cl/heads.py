"""One linear head per label level, grown in place as classes appear."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.precision import full_precision


class LevelHeads(nn.Module):
    """Linear heads ``features → classes of level l``; ``grow`` adds outputs and levels.

    Growing keeps the trained rows and extends the optimizer's per-parameter state (e.g. Adam
    moments) with zeros for the new rows instead of resetting it.
    """

    def __init__(self, in_dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_dim = in_dim
        self.device = torch.device(device)
        self.heads = nn.ModuleList()

    @property
    def sizes(self) -> list[int]:
        return [h.out_features for h in self.heads]

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [head(features) for head in self.heads]

    def grow(self, sizes: list[int], optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Make level l have ``sizes[l]`` outputs; returns whether anything changed."""
        changed = False
        for level, size in enumerate(sizes):
            if level == len(self.heads):
                head = nn.Linear(self.in_dim, size).to(self.device)
                self.heads.append(head)
                if optimizer is not None:
                    # A new group takes the *current* settings (an adaptive LR may have moved them).
                    current = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
                    optimizer.add_param_group({**current, "params": list(head.parameters())})
                changed = True
            elif size > self.heads[level].out_features:
                self.heads[level] = _grown(self.heads[level], size, optimizer)
                changed = True
        return changed


def hierarchical_ce(
    logits: list[torch.Tensor], y: torch.Tensor, level: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of each sample under its own level's head, averaged over the batch, in float32
    (log-softmax of reduced-precision logits loses digits; ``.float()`` is free on float32 ones)."""
    with full_precision(*logits):
        if len(logits) == 1 and len(y):  # flat streams: every sample is at level 0, no masking needed
            if weight is None:  # the fused mean: the same gradients as the per-sample losses' mean, one op fewer
                return F.cross_entropy(logits[0].float(), y)
            return (F.cross_entropy(logits[0].float(), y, reduction="none") * weight).mean()
        total = logits[0].new_zeros((), dtype=torch.float32)
        for lvl, out in enumerate(logits):
            mask = level == lvl
            if mask.any():
                losses = F.cross_entropy(out[mask].float(), y[mask], reduction="none")
                total = total + (losses if weight is None else losses * weight[mask]).sum()
        return total / max(len(y), 1)


def _grown(old: nn.Linear, size: int, optimizer: torch.optim.Optimizer | None) -> nn.Linear:
    new = nn.Linear(old.in_features, size).to(old.weight.device, old.weight.dtype)
    n = old.out_features
    with torch.no_grad():
        new.weight[:n] = old.weight
        new.bias[:n] = old.bias
    if optimizer is not None:
        for old_p, new_p in ((old.weight, new.weight), (old.bias, new.bias)):
            for group in optimizer.param_groups:
                group["params"] = [new_p if p is old_p else p for p in group["params"]]
            state = optimizer.state.pop(old_p, None)
            if state:
                optimizer.state[new_p] = {k: _pad(v, old_p, new_p) for k, v in state.items()}
    return new


def _pad(value: object, old_p: torch.Tensor, new_p: torch.Tensor) -> object:
    if isinstance(value, torch.Tensor) and value.shape == old_p.shape:
        out = torch.zeros_like(new_p, dtype=value.dtype)
        out[: old_p.shape[0]] = value
        return out
    return value
