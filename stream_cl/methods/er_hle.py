"""ER as the HLE code's own baseline: PL-FMS's training loop (:mod:`stream_cl.methods.hle_loop`) with a plain
reservoir memory.

The compute-matched reference for PL-FMS (:mod:`stream_cl.methods.pl_fms`): the same temporary
batch of ``batch_size / 2`` stream samples, ``online_iter`` updates of credit per sample, Adam,
crop+flip augmentation and CutMix per level group, per-level cross-entropy, but no flexible memory
sampling, no pseudo-labels, no importance scores and no adaptive learning rate. As in the HLE
code's ER (``er_baseline.py``), each update trains on every temporary sample plus
``batch_size / 2`` memory samples drawn uniformly without replacement, and the temporary batch is
written to memory (the store's own policy, a reservoir by default) only after its updates.
``lr_decay`` < 1 multiplies the rate by it after every update and resets it when a new class
appears (the HLE code's ER schedule, ExponentialLR 0.9999); the default keeps ``lr`` constant, as
PL-FMS with its adaptive rate switched off.
"""

from __future__ import annotations

from typing import Any

import torch

from buffers.store import ReplayStore
from stream_cl.classifier import Classifier
from stream_cl.learner import Batch, Observation, Prediction
from stream_cl.methods.common import StepGuard, core_state, load_core_state, require_number
from stream_cl.methods.hle_loop import LoopHooks, TemporaryBatchLoop


class ERHLE(LoopHooks):
    """PL-FMS's loop without its additions: the HLE code's ER baseline (see module doc).

    Parameters
    ----------
    model, buffer
        Backbone with level heads; any replay store (its policy decides what is kept).
    lr
        Adam learning rate (PL-FMS's starting rate).
    online_iter
        Updates per stream sample (> 0; CIFAR 3).
    batch_size
        Training batch B (even, >= 2): B / 2 stream samples and up to B / 2 memory samples.
    augment, cutmix_prob
        Crop+flip on every training batch; CutMix probability.
    lr_decay
        Factor applied to the rate after every update, reset to ``lr`` by a new class (1: constant).
    seed
        Seed of the method's generator (augmentation, CutMix).
    """

    name = "er-hle"

    def __init__(
        self,
        model: Classifier,
        buffer: ReplayStore,
        *,
        lr: float = 3e-4,
        online_iter: float = 3.0,
        batch_size: int = 16,
        augment: bool = True,
        cutmix_prob: float = 0.5,
        lr_decay: float = 1.0,
        seed: int = 0,
    ) -> None:
        require_number("lr", lr, gt=0)
        require_number("lr_decay", lr_decay, gt=0, le=1)
        self.model, self.buffer, self.labels = model, buffer, model.tree
        self.lr, self.lr_decay = lr, lr_decay
        self.schedules_lr = lr_decay < 1.0  # a restart keeps the checkpoint's rate: it is where the decay stands
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.guard = StepGuard(model)
        self.loop = TemporaryBatchLoop(
            model, buffer, self.optimizer, self.guard, self,
            online_iter=online_iter, batch_size=batch_size, augment=augment, autoaugment=False,
            cutmix_prob=cutmix_prob, amp=False, seed=seed,
        )  # fmt: skip

    def observe(self, batch: Batch) -> Observation:
        return self.loop.observe(batch)

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.model.predict(x)

    def new_classes(self) -> None:
        if self.lr_decay < 1.0:
            self.loop.set_lr(self.lr)

    def updated(self, loss: float | None) -> None:
        if loss is not None and self.lr_decay < 1.0:
            self.loop.set_lr(self.optimizer.param_groups[0]["lr"] * self.lr_decay)

    def trained(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        self.buffer.add(x, y, level)  # the HLE code's ER writes the temporary batch after its updates

    def state_dict(self) -> dict[str, Any]:
        return {**core_state(self.model, self.optimizer, self.buffer, self.guard), **self.loop.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_core_state(state, self.model, self.optimizer, self.buffer, self.guard)
        self.loop.load_state_dict(state)
