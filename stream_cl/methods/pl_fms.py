"""PL-FMS (Lee, Jung, Choi, Chun, "Online Continual Learning on Hierarchical Label Expansion", ICCV 2023).

Per incoming labelled sample (``n`` = labelled samples seen so far, this one included): a new class
grows its level's head and records its first-seen count ``n_c``; the sample is written to memory
at once (importance-based eviction from the most populated class, CLIB); it joins a temporary
batch, and every ``online_iter`` adds one update of credit. When the temporary batch holds
``batch_size / 2`` samples, ``floor(credit)`` updates run, each on: the temporary samples kept by
FMS (probability ``min(1, (n - n_c)·|C_seen| / (fms_factor·N))``, not on the first batch) plus
memory samples filling the batch to ``batch_size``; crop+flip augmentation (AutoAugment on top with
``autoaugment``); CutMix (p 0.5) per level group; per-level cross-entropy; Adam (mixed precision on
CUDA with ``amp``). Every ``imp_update_period`` updates the whole memory is re-scored (CLIB sample-wise
importance, in batches of 512 with one host transfer). The adaptive learning rate ticks at every
re-scoring (``adaptive_lr_schedule="every_rescore"``) or on the official code's schedule
(``"official"``: :class:`~stream_cl.methods.pl_fms_parts.OfficialAdaptiveLR`).

Choices where the spec (``algorithms.md`` §2) is UNVERIFIED or the paper and code differ, each a switch:

* ``pseudo_label`` (default on): the unreleased ``hp_fms`` term -- for every child-labelled sample
  of a batch whose parent head (level ``l - 1``) is confident (max softmax > ``tau`` = 0.75) and
  whose own head has > 1 output, add ``lambda_u · CE(parent logits, argmax)``. Only the immediate
  parent gets a pseudo-label. The histogram-gated second term of ``hp_fms`` is not implemented.
* ``pseudo_in_importance`` (default off, as in the released code): also count that pseudo-label
  term in the memory samples' losses used for importance scores.
* ``train_ancestors`` (default off, as in the paper: each sample is labelled at exactly one level):
  when on, a child-labelled sample also trains every ancestor head with the ancestors from its
  label path (known from the tree), and pseudo-labels are not used.
* Guard: a batch with a non-finite input or prediction is refused before it is written to memory;
  an update whose loss or gradients are non-finite is not taken, and the observed batch is then
  reported refused, though its samples were written to memory on arrival (as CLIB does).
* ``autoaugment`` (default off): AutoAugment's CIFAR-10 policy (:mod:`stream_cl.methods.autoaugment`,
  drawn from the method's generator) after crop + flip, both then on raw pixels with black padding
  (off: crop + flip on normalised inputs, padding with the mean). Needs uint8 images.
* ``adaptive_lr_schedule`` (default ``every_rescore``): ``official`` counts once per temporary batch
  whose last update re-scored the memory and measures the loss decrease over a whole window of
  ``lr_period`` counts (:class:`~stream_cl.methods.pl_fms_parts.OfficialAdaptiveLR`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from buffers.store import ReplayStore, class_keys
from stream_cl.classifier import Classifier
from stream_cl.inputs import PIXEL_MEAN, PIXEL_STD, to_model_input
from stream_cl.learner import Batch, Observation, Prediction, StepStats
from stream_cl.methods.autoaugment import auto_augment
from stream_cl.methods.common import (
    StepGuard,
    core_state,
    draw_replay,
    encode_labels,
    load_core_state,
    refused,
)
from stream_cl.methods.pl_fms_losses import (
    ancestor_targets,
    attach_importance_policy,
    parent_pseudo_loss,
    per_sample_ce,
)
from stream_cl.methods.pl_fms_parts import (
    AdaptiveLR,
    ImportanceScores,
    OfficialAdaptiveLR,
    augment,
    cutmix,
    fms_keep_probability,
)

LR_SCHEDULES = ("every_rescore", "official")


class PLFMS:
    """Pseudo-labelling + flexible memory sampling for hierarchical label expansion (see module doc).

    Parameters
    ----------
    model, buffer
        Backbone with level heads; an empty :class:`~buffers.memory.MemoryStore` (its policy is
        replaced by largest-class eviction with the importance hook) or a store whose policy is
        already a ``LargestClassPolicy(admit="always")``.
    lr
        Adam learning rate (the adaptive LR's starting high rate).
    online_iter
        Updates per stream sample (> 0; CIFAR 3).
    batch_size
        Training batch B (even, >= 2); the temporary stream batch holds B / 2.
    total_stream_length, fms_factor
        N and the factor of FMS's denominator (multi-depth code: 2).
    fms
        Use flexible memory sampling (off: keep every stream sample).
    pseudo_label, tau, lambda_u, pseudo_in_importance, train_ancestors
        Parent supervision of child-labelled samples (module doc).
    augment, autoaugment, cutmix_prob
        Crop+flip on every training batch; AutoAugment (CIFAR-10 policy) after it; CutMix probability.
    imp_update_period, beta
        Updates between memory re-scorings; EMA ratio of the importance update.
    adaptive_lr, adaptive_lr_schedule, lr_step, lr_period, lr_length, lr_warmup, significance
        CLIB adaptive learning rate (off: constant ``lr``), ticked at every re-scoring or on the
        official schedule (module doc).
    amp
        Mixed precision (float16 autocast, gradient scaling) for training and re-scoring on CUDA;
        ignored on other devices.
    seed
        Seed of the method's generator (FMS, augmentation, CutMix) and of the eviction ties.
    """

    name = "pl-fms"

    def __init__(
        self,
        model: Classifier,
        buffer: ReplayStore,
        *,
        lr: float = 3e-4,
        online_iter: float = 3.0,
        batch_size: int = 16,
        total_stream_length: int = 50_000,
        fms_factor: float = 1.0,
        fms: bool = True,
        pseudo_label: bool = True,
        tau: float = 0.75,
        lambda_u: float = 1.0,
        pseudo_in_importance: bool = False,
        train_ancestors: bool = False,
        augment: bool = True,
        autoaugment: bool = False,
        cutmix_prob: float = 0.5,
        imp_update_period: int = 5,
        beta: float = 0.9,
        adaptive_lr: bool = True,
        adaptive_lr_schedule: str = "every_rescore",
        lr_step: float = 0.95,
        lr_period: int = 10,
        lr_length: int = 10,
        lr_warmup: int = 20,
        significance: float = 0.05,
        amp: bool = True,
        seed: int = 0,
    ) -> None:
        if lr <= 0 or online_iter <= 0 or fms_factor <= 0 or lambda_u < 0:
            raise ValueError("lr, online_iter and fms_factor must be > 0 and lambda_u >= 0")
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be even and >= 2, got {batch_size}")
        if total_stream_length <= 0:
            raise ValueError(f"total_stream_length must be > 0, got {total_stream_length}")
        if not 0.0 <= tau < 1.0 or not 0.0 <= cutmix_prob <= 1.0:
            raise ValueError("tau must be in [0, 1) and cutmix_prob in [0, 1]")
        if imp_update_period <= 0:
            raise ValueError(f"imp_update_period must be > 0, got {imp_update_period}")
        if adaptive_lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"adaptive_lr_schedule must be one of {LR_SCHEDULES}, got {adaptive_lr_schedule!r}")
        self.model, self.buffer, self.labels = model, buffer, model.tree
        self.online_iter, self.batch_size, self.total_stream_length = online_iter, batch_size, total_stream_length
        self.fms, self.fms_factor = fms, fms_factor
        self.pseudo_label, self.tau, self.lambda_u = pseudo_label and not train_ancestors, tau, lambda_u
        self.pseudo_in_importance, self.train_ancestors = pseudo_in_importance, train_ancestors
        self.augment, self.autoaugment = augment, autoaugment
        self.cutmix_prob, self.imp_update_period = cutmix_prob, imp_update_period
        self.scores = ImportanceScores(buffer.capacity, beta=beta)
        attach_importance_policy(buffer, self.scores, seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.guard = StepGuard(model)
        self.amp = amp and model.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        schedule = OfficialAdaptiveLR if adaptive_lr_schedule == "official" else AdaptiveLR
        lr_knobs = {"step": lr_step, "period": lr_period, "length": lr_length, "warmup": lr_warmup}
        self.lr_control = schedule(lr, **lr_knobs, significance=significance) if adaptive_lr else None
        self.gen = torch.Generator().manual_seed(seed)
        self.n = 0
        self.first_seen: dict[int, int] = {}
        self.credit = 0.0
        self.iterations = 0
        self.trained_once = False
        self._tmp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def observe(self, batch: Batch) -> Observation:
        if self.autoaugment and (batch.x.dtype != torch.uint8 or batch.x.dim() != 4 or batch.x.shape[-1] != 3):
            got = f"{batch.x.dtype}{list(batch.x.shape)}"
            raise ValueError(f"autoaugment needs uint8 RGB images (N, H, W, 3), got {got}")
        x_raw = batch.x.to(self.model.device, non_blocking=True)
        x = to_model_input(x_raw)
        prediction = self.model.predict_prepared(x)
        reason = self.guard.screen(x, prediction, batch.labels)
        if reason is not None:
            return refused(prediction, self.labels, batch.labels, reason)
        level, y, new, learn = encode_labels(self.model, self.optimizer, batch.labels)
        rows = torch.nonzero(learn).flatten()
        losses, replayed, half, refusal = [], 0, self.batch_size // 2, None
        start = 0
        while start < len(rows):
            chunk = rows[start : start + half - self._tmp_len()]
            start += len(chunk)
            self._arrive(x_raw[chunk], y[chunk], level[chunk])
            if self._tmp_len() >= half:
                loss, n_replayed, refused_as = self._train()
                replayed += n_replayed
                refusal = refusal or refused_as
                if loss is not None:
                    losses.append(loss)
        if refusal is not None:
            return Observation(prediction, level, y, StepStats(None, 0, 0, rejected=refusal), new)
        loss = float(np.mean(losses)) if losses else None
        return Observation(prediction, level, y, StepStats(loss, len(rows), replayed), new)

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.model.predict(x)

    def _tmp_len(self) -> int:
        return 0 if self._tmp is None else len(self._tmp[1])

    def _arrive(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        """Count, record first-seen times, write to memory at once, join the temporary batch."""
        keys = class_keys(y.cpu().numpy(), level.cpu().numpy())
        for i, key in enumerate(keys.tolist()):
            self.first_seen.setdefault(key, self.n + i + 1)
        self.n += len(keys)
        self.scores.written(self.buffer.add(x, y, level), keys)
        new = (x, y, level)
        self._tmp = new if self._tmp is None else tuple(torch.cat(p) for p in zip(self._tmp, new, strict=True))
        self.credit += self.online_iter * len(keys)

    def _train(self) -> tuple[float | None, int, str | None]:
        """Run the credited updates on the temporary batch; returns mean loss, replayed samples and the reason
        the first refused update was refused (None: none was)."""
        x_s, y_s, level_s = self._tmp
        self._tmp = None
        iters = int(self.credit)
        self.credit -= iters
        losses, replayed, refusal = [], 0, None
        level_s_host = level_s.cpu()  # CutMix groups by level on the host: one transfer per temporary batch
        keep_p = None
        if self.fms and self.trained_once:
            keys = class_keys(y_s.cpu().numpy(), level_s_host.numpy())
            first = np.array([self.first_seen[k] for k in keys.tolist()])
            p = fms_keep_probability(self.n, first, sum(self.labels.sizes), self.total_stream_length, self.fms_factor)
            keep_p = torch.from_numpy(p)
        for _ in range(iters):
            keep = torch.ones(len(y_s), dtype=torch.bool)
            if keep_p is not None:
                keep = torch.rand(len(keep_p), generator=self.gen) < keep_p
            memory = draw_replay(self.model, self.optimizer, self.buffer, self.batch_size - int(keep.sum()))
            slots = memory.slot.cpu()
            self.scores.note_used(slots.numpy())
            replayed += len(memory)
            kept = keep.to(y_s.device)
            x = torch.cat([x_s[kept], memory.x.to(x_s.device)]) if len(memory) else x_s[kept]
            y = torch.cat([y_s[kept], memory.y.to(y_s.device)])
            level = torch.cat([level_s[kept], memory.level.to(y_s.device)])
            if len(y):
                level_host = torch.cat([level_s_host[keep], memory.level.cpu()])
                loss = self._step(x, y, level, level_host)
                if loss is None:
                    refusal = refusal or self.guard.reason
                else:
                    losses.append(loss)
            self.iterations += 1
            if self.iterations % self.imp_update_period == 0:
                decrease = self._rescore()
                if isinstance(self.lr_control, AdaptiveLR):
                    self._set_lr(self.lr_control.tick(decrease))
        if isinstance(self.lr_control, OfficialAdaptiveLR) and self.iterations % self.imp_update_period == 0:
            size = len(self.buffer)
            self._set_lr(self.lr_control.count(self.scores.prev_loss[:size], self.scores.writes[:size]))
        self.trained_once = True
        return (float(np.mean(losses)) if losses else None), replayed, refusal

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

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
        n = len(y)
        with self._autocast():
            logits = self.model.logits(self.model(x))
            loss = per_sample_ce(logits, y, level).sum() / n
            if partner is not None:
                loss = lam * loss + (1.0 - lam) * per_sample_ce(logits, y[partner], level).sum() / n
            if self.train_ancestors:
                for anc_level, anc_y in ancestor_targets(self.labels.parent_maps(), y, level):
                    loss = loss + per_sample_ce(logits, anc_y, anc_level).sum() / n
            if self.pseudo_label:
                loss = loss + parent_pseudo_loss(logits, level, self.tau, self.lambda_u).sum() / n
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return self.guard.step(loss, self.optimizer, self.scaler)

    @torch.inference_mode()
    def _rescore(self, chunk: int = 512) -> float | None:
        """Loss of every stored sample under its own head (eval mode), fed to the importance update.

        Chunks of ``chunk`` samples; the losses stay on the device until one transfer at the end.
        """
        size = len(self.buffer)
        if size == 0:
            return None
        stored = draw_replay(self.model, self.optimizer, self.buffer, size)
        self.model.eval()
        try:
            parts = []
            for i in range(0, size, chunk):
                x = to_model_input(stored.x[i : i + chunk].to(self.model.device))
                y, level = stored.y[i : i + chunk].to(x.device), stored.level[i : i + chunk].to(x.device)
                with self._autocast():
                    logits = self.model.logits(self.model(x))
                part = per_sample_ce(logits, y, level)
                if self.pseudo_in_importance:
                    part = part + parent_pseudo_loss(logits, level, self.tau, self.lambda_u)
                parts.append(part.float())
            loss = torch.cat(parts).cpu().numpy()
        finally:
            self.model.train()
        by_slot = np.empty(size)
        by_slot[stored.slot.cpu().numpy()] = loss
        return self.scores.update_importance(by_slot)

    def state_dict(self) -> dict[str, Any]:
        tmp = self._tmp or (torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        return {
            **core_state(self.model, self.optimizer, self.buffer, self.guard),
            "scores": self.scores.state_dict(),
            "lr_control": None if self.lr_control is None else self.lr_control.state_dict(),
            "gen": self.gen.get_state(),
            "n": self.n,
            "first_seen": [list(self.first_seen), list(self.first_seen.values())],
            "credit": self.credit,
            "iterations": self.iterations,
            "trained_once": self.trained_once,
            "tmp": [t.cpu() for t in tmp],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_core_state(state, self.model, self.optimizer, self.buffer, self.guard)
        self.scores.load_state_dict(state["scores"])
        if self.lr_control is not None and state["lr_control"] is not None:
            if set(state["lr_control"]) != set(self.lr_control.state_dict()):
                raise ValueError("the checkpoint was written with another adaptive_lr_schedule")
            self.lr_control.load_state_dict(state["lr_control"])
        self.gen.set_state(state["gen"])
        self.n, self.credit, self.iterations = int(state["n"]), float(state["credit"]), int(state["iterations"])
        self.trained_once = bool(state["trained_once"])
        self.first_seen = dict(zip(*state["first_seen"], strict=True))
        tmp = [t.to(self.model.device) for t in state["tmp"]]
        self._tmp = tuple(tmp) if len(tmp[1]) else None
