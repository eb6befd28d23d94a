"""OnPro over a label hierarchy (HLE streams): prototypes and cross-entropy at every level a label reaches."""

from __future__ import annotations

import torch

from buffers.store import ReplayStore
from stream_cl.classifier import Classifier
from stream_cl.methods.onpro import OnPro
from stream_cl.methods.onpro_losses import class_means, keys_by_level, mixup_ce, proto_loss


class OnProHLE(OnPro):
    """OnPro that uses the label tree: a sample labelled ``("vehicles_1", "pickup_truck")`` is a pickup
    truck for the child level and, through its path, a ``vehicles_1`` for the parent level.

    Plain OnPro keys every prototype and cross-entropy target by the sample's own (level, class), so a
    child-labelled sample is a negative of its own parent's prototype, and the parent head learns only
    from parent-labelled samples. Here, for each level k of the tree:

    * **OPE per level**: L_OPE (stream and replay) is the sum over levels of OnPro's prototype loss
      among the rows that have a class at k, their own or their ancestor's; a child's view and its
      parent's prototype pull together at level k - 1 while siblings stay apart at level k.
    * **CE per level**: every head is trained on every row that has a class at its level (own or
      ancestor), with the row's APF mixing weights.

    The instance-wise contrast (OCM) and APF's class means stay on each row's own class. On a flat
    stream (one level) this is OnPro, step for step; so it is with both switches below off.

    Parameters
    ----------
    level_prototypes
        OPE per level (off: OnPro's OPE over each row's own class).
    level_targets
        CE per level (off: OnPro's CE, each row under its own level's head only).
    onpro
        The hyper-parameters of :class:`OnPro`.
    """

    name = "onpro-hle"

    def __init__(
        self,
        model: Classifier,
        buffer: ReplayStore,
        *,
        level_prototypes: bool = True,
        level_targets: bool = True,
        **onpro,
    ) -> None:
        super().__init__(model, buffer, **onpro)
        self.level_prototypes, self.level_targets = level_prototypes, level_targets

    def _ope(
        self, z1: torch.Tensor, z2: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.level_prototypes:
            return super()._ope(z1, z2, keys)
        loss = z1.new_zeros((), dtype=torch.float32)
        for level_keys in keys_by_level(keys, self.labels.parent_maps()):
            rows = level_keys >= 0
            if bool(rows.all()):
                loss = loss + proto_loss(z1, z2, level_keys, temperature=self.proto_temperature)[0]
            elif bool(rows.any()):
                loss = loss + proto_loss(z1[rows], z2[rows], level_keys[rows], temperature=self.proto_temperature)[0]
        present, mean1, mean2 = class_means(z1, z2, keys)
        return loss, present, ((mean1 + mean2) / 2).detach()

    def _ce(self, logits: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        if not self.level_targets:
            return super()._ce(logits, a, b, lam)
        logits = [lg.float() for lg in logits]
        maps = self.labels.parent_maps()
        total = logits[0].new_zeros(())
        for keys_a, keys_b in zip(keys_by_level(a, maps), keys_by_level(b, maps), strict=True):
            total = total + mixup_ce(logits, keys_a, keys_b, lam)
        return total
