"""A backbone with one growing head per label level: what every method trains."""

from __future__ import annotations

import torch
from torch import nn

from stream_cl.heads import LevelHeads
from stream_cl.inputs import to_model_input
from stream_cl.labels import LabelTree
from stream_cl.learner import Prediction
from stream_cl.models import mode_matters


class Classifier(nn.Module):
    """``features = backbone(x)``; ``logits[l] = heads[l](features)``; labels from ``tree``.

    ``sync`` grows the heads to the tree's class counts, extending the optimizer's state.
    """

    def __init__(self, backbone: nn.Module, tree: LabelTree, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device)
        self.heads = LevelHeads(backbone.out_dim, self.device)
        self.tree = tree
        self.switch_mode = mode_matters(self.backbone)
        self._synced_version = -1  # the tree's version the heads were last grown to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of prepared (float) inputs."""
        return self.backbone(x)

    def logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        if _has_hooks(self.heads):
            return self.heads(features)
        return [head(features) for head in self.heads.heads]  # the heads' own call: one module dispatch fewer a step

    def level_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``logits(self(x))``; without this module's ``__call__`` (which a small model pays per step) unless a hook
        is registered on it, so hooks always run."""
        return self.logits(self(x) if _has_hooks(self) else self.backbone(x))

    def sync(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Grow heads to the label tree; returns whether they changed. Free when the tree has not changed since."""
        if self.tree.version == self._synced_version:
            return False
        changed = self.heads.grow(self.tree.sizes, optimizer)
        self._synced_version = self.tree.version
        return changed

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Prediction:
        """Per-level argmax and softmax confidence for raw stored inputs, in eval mode."""
        return self.predict_prepared(to_model_input(x.to(self.device, non_blocking=True)))

    @torch.no_grad()
    def predict_prepared(self, x: torch.Tensor) -> Prediction:
        was_training = self.training and self.switch_mode
        if was_training:
            self.eval()
        try:
            logits = self.level_logits(x) if len(self.heads.heads) else []
        finally:
            if was_training:
                self.train()
        n, depth = x.shape[0], max(self.tree.depth, 1)
        levels = [out.float().softmax(dim=1).max(dim=1, keepdim=True) for out in logits]  # (n, 1) columns
        if depth == 1 and levels:  # flat: the one column is the prediction
            confidence, classes = levels[0]
            return Prediction(classes, confidence)
        if levels and len(levels) == depth:  # every level has a head: no -1 padding needed
            classes = torch.cat([cls for _, cls in levels], dim=1)
            return Prediction(classes, torch.cat([conf for conf, _ in levels], dim=1))
        classes = torch.full((n, depth), -1, dtype=torch.long, device=x.device)
        confidence = torch.zeros((n, depth), device=x.device)
        for level, (conf, cls) in enumerate(levels):
            classes[:, level : level + 1], confidence[:, level : level + 1] = cls, conf
        return Prediction(classes, confidence)


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module.__call__`` would run hooks (its own or global ones): what ``Module._call_impl`` checks."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_backward_hooks
        or nn.modules.module._global_backward_pre_hooks
    )
