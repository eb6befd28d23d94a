"""ER as the HLE code's own baseline: PL-FMS's training loop with a plain reservoir memory.

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

import numpy as np
import torch

from buffers.store import ReplayStore
from stream_cl.classifier import Classifier
from stream_cl.heads import hierarchical_ce
from stream_cl.inputs import to_model_input
from stream_cl.learner import Batch, Observation, Prediction, StepStats
from stream_cl.methods.common import StepGuard, core_state, draw_replay, encode_labels, load_core_state, refused
from stream_cl.methods.pl_fms_parts import augment, cutmix


class ERHLE:
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
        if lr <= 0 or online_iter <= 0:
            raise ValueError("lr and online_iter must be > 0")
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be even and >= 2, got {batch_size}")
        if not 0.0 <= cutmix_prob <= 1.0 or not 0.0 < lr_decay <= 1.0:
            raise ValueError("cutmix_prob must be in [0, 1] and lr_decay in (0, 1]")
        self.model, self.buffer, self.labels = model, buffer, model.tree
        self.lr, self.online_iter, self.batch_size = lr, online_iter, batch_size
        self.augment, self.cutmix_prob, self.lr_decay = augment, cutmix_prob, lr_decay
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.guard = StepGuard(model)
        self.gen = torch.Generator().manual_seed(seed)
        self.credit = 0.0
        self._tmp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def observe(self, batch: Batch) -> Observation:
        x_raw = batch.x.to(self.model.device, non_blocking=True)
        x = to_model_input(x_raw)
        prediction = self.model.predict_prepared(x)
        reason = self.guard.screen(x, prediction, batch.labels)
        if reason is not None:
            return refused(prediction, self.labels, batch.labels, reason)
        level, y, new, learn = encode_labels(self.model, self.optimizer, batch.labels)
        if new and self.lr_decay < 1.0:
            self._set_lr(self.lr)
        rows = torch.nonzero(learn).flatten()
        losses, replayed, half, refusal = [], 0, self.batch_size // 2, None
        start = 0
        while start < len(rows):
            chunk = rows[start : start + half - self._tmp_len()]
            start += len(chunk)
            self._arrive(x_raw[chunk], y[chunk], level[chunk])
            if self._tmp_len() >= half:
                step_losses, n_replayed, refused_as = self._train()
                losses += step_losses
                replayed += n_replayed
                refusal = refusal or refused_as
        if refusal is not None:
            return Observation(prediction, level, y, StepStats(None, 0, 0, rejected=refusal), new)
        loss = float(np.mean(losses)) if losses else None
        return Observation(prediction, level, y, StepStats(loss, len(rows), replayed), new)

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.model.predict(x)

    def _tmp_len(self) -> int:
        return 0 if self._tmp is None else len(self._tmp[1])

    def _arrive(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        new = (x, y, level)
        self._tmp = new if self._tmp is None else tuple(torch.cat(p) for p in zip(self._tmp, new, strict=True))
        self.credit += self.online_iter * len(y)

    def _train(self) -> tuple[list[float], int, str | None]:
        """The credited updates on the temporary batch, then its write to memory; the updates' losses,
        the replayed samples and the reason of the first refused update (None: none was)."""
        x_s, y_s, level_s = self._tmp
        self._tmp = None
        iters = int(self.credit)
        self.credit -= iters
        losses, replayed, refusal = [], 0, None
        for _ in range(iters):
            memory = draw_replay(self.model, self.optimizer, self.buffer, self.batch_size - self.batch_size // 2)
            replayed += len(memory)
            x = torch.cat([x_s, memory.x.to(x_s.device)]) if len(memory) else x_s  # keep the stored dtype
            y = torch.cat([y_s, memory.y.to(y_s.device)])
            level = torch.cat([level_s, memory.level.to(y_s.device)])
            loss = self._step(to_model_input(x), y, level)
            if loss is None:
                refusal = refusal or self.guard.reason
            else:
                losses.append(loss)
        self.buffer.add(x_s, y_s, level_s)
        return losses, replayed, refusal

    def _step(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> float | None:
        """One update; its loss, or None when the guard refused it (loss or gradients non-finite)."""
        self.model.train()
        self.guard.begin()
        if self.augment and x.dim() == 4:
            x = augment(x, self.gen)
        partner, lam = None, 1.0
        if x.dim() == 4 and float(torch.rand((), generator=self.gen)) < self.cutmix_prob:
            x, partner, lam = cutmix(x, level, self.gen)
        logits = self.model.logits(self.model(x))
        loss = hierarchical_ce(logits, y, level)
        if partner is not None:
            loss = lam * loss + (1.0 - lam) * hierarchical_ce(logits, y[partner], level)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = self.guard.step(loss, self.optimizer)
        if value is not None and self.lr_decay < 1.0:
            self._set_lr(self.optimizer.param_groups[0]["lr"] * self.lr_decay)
        return value

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        tmp = self._tmp or (torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        return {
            **core_state(self.model, self.optimizer, self.buffer, self.guard),
            "gen": self.gen.get_state(),
            "credit": self.credit,
            "tmp": [t.cpu() for t in tmp],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_core_state(state, self.model, self.optimizer, self.buffer, self.guard)
        self.gen.set_state(state["gen"])
        self.credit = float(state["credit"])
        tmp = [t.to(self.model.device) for t in state["tmp"]]
        self._tmp = tuple(tmp) if len(tmp[1]) else None
