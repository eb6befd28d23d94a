"""The HLE code's training loop, shared by PL-FMS (:mod:`stream_cl.methods.pl_fms`) and its
compute-matched ER (:mod:`stream_cl.methods.er_hle`).

Labelled stream samples join a temporary batch of ``batch_size / 2``, each adding ``online_iter``
updates of credit. When the temporary batch is full, ``floor(credit)`` updates run, each on the
temporary samples (those the method keeps) plus memory samples filling the batch to ``batch_size``:
crop+flip augmentation (AutoAugment on top with ``autoaugment``), CutMix per level group, the
method's loss, Adam (mixed precision on CUDA with ``amp``). What a method adds to this loop --
when it writes to memory, which stream samples it keeps, extra loss terms, what follows an update --
it plugs in through :class:`LoopHooks`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from buffers.store import ReplayStore
from stream_cl.classifier import Classifier
from stream_cl.heads import hierarchical_ce
from stream_cl.inputs import PIXEL_MEAN, PIXEL_STD, to_model_input
from stream_cl.learner import Batch, Observation, StepStats
from stream_cl.methods.autoaugment import auto_augment
from stream_cl.methods.common import StepGuard, draw_replay, encode_labels, refused, require_number
from stream_cl.methods.hle_augment import augment, cutmix

Samples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Stored inputs, class indices and levels of some samples."""


class LoopHooks:
    """What a method adds to :class:`TemporaryBatchLoop`; every default adds nothing."""

    def new_classes(self) -> None:
        """Classes first seen in the observed batch were added (before any of its updates)."""

    def arrived(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        """Labelled samples joined the temporary batch (stored inputs)."""

    def keep_probability(self, y: torch.Tensor, level_host: torch.Tensor) -> torch.Tensor | None:
        """Per temporary sample, the probability that an update trains on it; None: every update uses all."""
        return None

    def replayed(self, slots: torch.Tensor) -> None:
        """The memory slots drawn for one update."""

    def label_loss(self, logits: list[torch.Tensor], y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Loss of the labels ``y`` (CutMix also calls it with the partners' labels)."""
        return hierarchical_ce(logits, y, level)

    def add_terms(
        self, loss: torch.Tensor, logits: list[torch.Tensor], y: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor:
        """``loss`` with the method's other terms added."""
        return loss

    def updated(self, loss: float | None) -> None:
        """One update ran (``loss`` None: refused, or nothing to train on)."""

    def trained(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        """The temporary batch's updates are done (its samples, stored inputs)."""


class TemporaryBatchLoop:
    """The HLE training loop (module doc); the method owning it passes its :class:`LoopHooks`.

    Parameters
    ----------
    model, buffer, optimizer, guard
        The method's backbone with level heads, replay store, Adam optimizer and step guard.
    hooks
        What the method adds.
    online_iter
        Updates per stream sample (> 0).
    batch_size
        Training batch B (even, >= 2); the temporary stream batch holds B / 2.
    augment, autoaugment, cutmix_prob
        Crop+flip on every training batch; AutoAugment (CIFAR-10 policy) after it, on raw pixels
        (needs uint8 images); CutMix probability.
    amp
        Mixed precision (float16 autocast, gradient scaling) on CUDA; ignored on other devices.
    seed
        Seed of the loop's generator (kept stream samples, augmentation, CutMix).
    """

    def __init__(
        self,
        model: Classifier,
        buffer: ReplayStore,
        optimizer: torch.optim.Optimizer,
        guard: StepGuard,
        hooks: LoopHooks,
        *,
        online_iter: float,
        batch_size: int,
        augment: bool,
        autoaugment: bool,
        cutmix_prob: float,
        amp: bool,
        seed: int,
    ) -> None:
        require_number("online_iter", online_iter, gt=0)
        require_number("batch_size", batch_size, integer=True, ge=2)
        if batch_size % 2:
            raise ValueError(f"batch_size must be even, got {batch_size}")
        require_number("cutmix_prob", cutmix_prob, ge=0, le=1)
        require_number("seed", seed, integer=True)
        self.model, self.buffer, self.optimizer, self.guard, self.hooks = model, buffer, optimizer, guard, hooks
        self.online_iter, self.batch_size = online_iter, batch_size
        self.augment, self.autoaugment, self.cutmix_prob = augment, autoaugment, cutmix_prob
        self.amp = amp and model.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.gen = torch.Generator().manual_seed(seed)
        self.credit = 0.0
        self.waiting: Samples | None = None

    def observe(self, batch: Batch) -> Observation:
        if self.autoaugment and (batch.x.dtype != torch.uint8 or batch.x.dim() != 4 or batch.x.shape[-1] != 3):
            got = f"{batch.x.dtype}{list(batch.x.shape)}"
            raise ValueError(f"autoaugment needs uint8 RGB images (N, H, W, 3), got {got}")
        x_raw = batch.x.to(self.model.device, non_blocking=True)
        x = to_model_input(x_raw)
        prediction = self.model.predict_prepared(x)
        reason = self.guard.screen(x, prediction, batch.labels)
        if reason is not None:
            return refused(prediction, self.model.tree, batch.labels, reason)
        level, y, new, learn = encode_labels(self.model, self.optimizer, batch.labels)
        if new:
            self.hooks.new_classes()
        rows = torch.nonzero(learn).flatten()
        losses, replayed, half, refusal = [], 0, self.batch_size // 2, None
        start = 0
        while start < len(rows):
            chunk = rows[start : start + half - self.n_waiting()]
            start += len(chunk)
            self._arrive(x_raw[chunk], y[chunk], level[chunk])
            if self.n_waiting() >= half:
                batch_losses, n_replayed, refused_as = self._train()
                losses += batch_losses
                replayed += n_replayed
                refusal = refusal or refused_as
        if refusal is not None:
            return Observation(prediction, level, y, StepStats(None, 0, 0, rejected=refusal), new)
        loss = float(np.mean(losses)) if losses else None
        return Observation(prediction, level, y, StepStats(loss, len(rows), replayed), new)

    def n_waiting(self) -> int:
        """Samples in the temporary batch, waiting for it to fill."""
        return 0 if self.waiting is None else len(self.waiting[1])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def _arrive(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        self.hooks.arrived(x, y, level)
        new = (x, y, level)
        self.waiting = new if self.waiting is None else tuple(torch.cat(p) for p in zip(self.waiting, new, strict=True))
        self.credit += self.online_iter * len(y)

    def _train(self) -> tuple[list[float], int, str | None]:
        """The credited updates on the temporary batch; their losses, the replayed samples and the reason
        the first refused update was refused (None: none was)."""
        x_s, y_s, level_s = self.waiting
        self.waiting = None
        iters = int(self.credit)
        self.credit -= iters
        losses, replayed, refusal = [], 0, None
        level_s_host = level_s.cpu()  # CutMix groups by level on the host: one transfer per temporary batch
        keep_p = self.hooks.keep_probability(y_s, level_s_host)
        for _ in range(iters):
            keep = torch.ones(len(y_s), dtype=torch.bool)
            if keep_p is not None:
                keep = torch.rand(len(keep_p), generator=self.gen) < keep_p
            memory = draw_replay(self.model, self.optimizer, self.buffer, self.batch_size - int(keep.sum()))
            self.hooks.replayed(memory.slot)
            replayed += len(memory)
            kept = keep.to(y_s.device)
            x = torch.cat([x_s[kept], memory.x.to(x_s.device)]) if len(memory) else x_s[kept]  # keep the stored dtype
            y = torch.cat([y_s[kept], memory.y.to(y_s.device)])
            level = torch.cat([level_s[kept], memory.level.to(y_s.device)])
            loss = None
            if len(y):
                level_host = torch.cat([level_s_host[keep], memory.level.cpu()])
                loss = self._step(x, y, level, level_host)
                if loss is None:
                    refusal = refusal or self.guard.reason
                else:
                    losses.append(loss)
            self.hooks.updated(loss)
        self.hooks.trained(x_s, y_s, level_s)
        return losses, replayed, refusal

    def _inputs(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Augmented model inputs of a stored batch."""
        if self.autoaugment:  # crop, flip and AutoAugment on raw pixels, as the official transform does
            pixels = x_raw.permute(0, 3, 1, 2).float()
            if self.augment:
                pixels = augment(pixels, self.gen)
            return auto_augment(pixels, self.gen).div_(255.0).sub_(PIXEL_MEAN).div_(PIXEL_STD)
        x = to_model_input(x_raw)
        return augment(x, self.gen) if self.augment and x.dim() == 4 else x

    def _step(
        self, x_raw: torch.Tensor, y: torch.Tensor, level: torch.Tensor, level_host: torch.Tensor
    ) -> float | None:
        """One update; its loss, or None when the guard refused it (loss or gradients non-finite).

        ``level_host`` is ``level`` on the host (CutMix's groups).
        """
        if not self.model.training:  # a full train() walks every module: ~90 calls per update
            self.model.train()
        self.guard.begin()
        x = self._inputs(x_raw)
        partner, lam = None, 1.0
        if x.dim() == 4 and float(torch.rand((), generator=self.gen)) < self.cutmix_prob:
            x, partner, lam = cutmix(x, level_host, self.gen)
        with self.autocast():
            logits = self.model.logits(self.model(x))
            loss = self.hooks.label_loss(logits, y, level)
            if partner is not None:
                loss = lam * loss + (1.0 - lam) * self.hooks.label_loss(logits, y[partner], level)
            loss = self.hooks.add_terms(loss, logits, y, level)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return self.guard.step(loss, self.optimizer, self.scaler)

    def state_dict(self) -> dict[str, Any]:
        empty = (torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        return {"gen": self.gen.get_state(), "credit": self.credit, "tmp": [t.cpu() for t in self.waiting or empty]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.credit = float(state["credit"])
        tmp = [t.to(self.model.device) for t in state["tmp"]]
        self.waiting = tuple(tmp) if len(tmp[1]) else None
