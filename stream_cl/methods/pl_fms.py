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
The temporary-batch loop is :mod:`stream_cl.methods.hle_loop`, shared with ER-HLE; this class plugs
FMS, the importance memory, pseudo-labels (or ancestor targets) and the adaptive rate into it.

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

from typing import Any

import numpy as np
import torch

from buffers.store import ReplayStore, class_keys
from stream_cl.classifier import Classifier
from stream_cl.inputs import to_model_input
from stream_cl.learner import Batch, Observation, Prediction
from stream_cl.methods.common import StepGuard, core_state, draw_replay, load_core_state, require_number
from stream_cl.methods.hle_loop import LoopHooks, TemporaryBatchLoop
from stream_cl.methods.pl_fms_losses import (
    ancestor_targets,
    attach_importance_policy,
    parent_pseudo_loss,
    per_sample_ce,
)
from stream_cl.methods.pl_fms_parts import AdaptiveLR, ImportanceScores, OfficialAdaptiveLR, fms_keep_probability

LR_SCHEDULES = ("every_rescore", "official")


class PLFMS(LoopHooks):
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
        require_number("lr", lr, gt=0)
        require_number("fms_factor", fms_factor, gt=0)
        require_number("lambda_u", lambda_u, ge=0)
        require_number("total_stream_length", total_stream_length, integer=True, gt=0)
        require_number("tau", tau, ge=0, lt=1)
        require_number("imp_update_period", imp_update_period, integer=True, gt=0)
        require_number("seed", seed, integer=True)  # seeds the eviction ties before the loop checks it
        if adaptive_lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"adaptive_lr_schedule must be one of {LR_SCHEDULES}, got {adaptive_lr_schedule!r}")
        self.model, self.buffer, self.labels = model, buffer, model.tree
        self.total_stream_length, self.fms, self.fms_factor = total_stream_length, fms, fms_factor
        self.pseudo_label, self.tau, self.lambda_u = pseudo_label and not train_ancestors, tau, lambda_u
        self.pseudo_in_importance, self.train_ancestors = pseudo_in_importance, train_ancestors
        self.imp_update_period = imp_update_period
        self.scores = ImportanceScores(buffer.capacity, beta=beta)
        attach_importance_policy(buffer, self.scores, seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.guard = StepGuard(model)
        self.loop = TemporaryBatchLoop(
            model, buffer, self.optimizer, self.guard, self,
            online_iter=online_iter, batch_size=batch_size, augment=augment, autoaugment=autoaugment,
            cutmix_prob=cutmix_prob, amp=amp, seed=seed,
        )  # fmt: skip
        schedule = OfficialAdaptiveLR if adaptive_lr_schedule == "official" else AdaptiveLR
        lr_knobs = {"step": lr_step, "period": lr_period, "length": lr_length, "warmup": lr_warmup}
        self.lr_control = schedule(lr, **lr_knobs, significance=significance) if adaptive_lr else None
        self.schedules_lr = adaptive_lr  # a restart keeps the checkpoint's rate: it is where the schedule stands
        self.n = 0
        self.first_seen: dict[int, int] = {}
        self.iterations = 0
        self.trained_once = False

    def observe(self, batch: Batch) -> Observation:
        return self.loop.observe(batch)

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.model.predict(x)

    def arrived(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        """Count, record first-seen times, write to memory at once (as CLIB does)."""
        keys = class_keys(y.cpu().numpy(), level.cpu().numpy())
        for i, key in enumerate(keys.tolist()):
            self.first_seen.setdefault(key, self.n + i + 1)
        self.n += len(keys)
        self.scores.written(self.buffer.add(x, y, level), keys)

    def keep_probability(self, y: torch.Tensor, level_host: torch.Tensor) -> torch.Tensor | None:
        """FMS, from the second temporary batch on."""
        if not (self.fms and self.trained_once):
            return None
        keys = class_keys(y.cpu().numpy(), level_host.numpy())
        first = np.array([self.first_seen[k] for k in keys.tolist()])
        p = fms_keep_probability(self.n, first, sum(self.labels.sizes), self.total_stream_length, self.fms_factor)
        return torch.from_numpy(p)

    def replayed(self, slots: torch.Tensor) -> None:
        self.scores.note_used(slots.cpu().numpy())

    def label_loss(self, logits: list[torch.Tensor], y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return per_sample_ce(logits, y, level).sum() / len(y)

    def add_terms(
        self, loss: torch.Tensor, logits: list[torch.Tensor], y: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor:
        if self.train_ancestors:
            for anc_level, anc_y in ancestor_targets(self.labels.parent_maps(), y, level):
                loss = loss + per_sample_ce(logits, anc_y, anc_level).sum() / len(y)
        if self.pseudo_label:
            loss = loss + parent_pseudo_loss(logits, level, self.tau, self.lambda_u).sum() / len(y)
        return loss

    def updated(self, loss: float | None) -> None:
        """Every ``imp_update_period`` updates: re-score the memory, tick the every-rescore adaptive rate."""
        self.iterations += 1
        if self.iterations % self.imp_update_period == 0:
            decrease = self._rescore()
            if isinstance(self.lr_control, AdaptiveLR):
                self.loop.set_lr(self.lr_control.tick(decrease))

    def trained(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        """Count a temporary batch whose last update re-scored the memory on the official rate schedule."""
        if isinstance(self.lr_control, OfficialAdaptiveLR) and self.iterations % self.imp_update_period == 0:
            size = len(self.buffer)
            self.loop.set_lr(self.lr_control.count(self.scores.prev_loss[:size], self.scores.writes[:size]))
        self.trained_once = True

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
                with self.loop.autocast():
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
        return {
            **core_state(self.model, self.optimizer, self.buffer, self.guard),
            **self.loop.state_dict(),
            "scores": self.scores.state_dict(),
            "lr_control": None if self.lr_control is None else self.lr_control.state_dict(),
            "n": self.n,
            "first_seen": [list(self.first_seen), list(self.first_seen.values())],
            "iterations": self.iterations,
            "trained_once": self.trained_once,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_core_state(state, self.model, self.optimizer, self.buffer, self.guard)
        self.loop.load_state_dict(state)
        self.scores.load_state_dict(state["scores"])
        if self.lr_control is not None and state["lr_control"] is not None:
            if set(state["lr_control"]) != set(self.lr_control.state_dict()):
                raise ValueError("the checkpoint was written with another adaptive_lr_schedule")
            self.lr_control.load_state_dict(state["lr_control"])
        self.n, self.iterations = int(state["n"]), int(state["iterations"])
        self.trained_once = bool(state["trained_once"])
        self.first_seen = dict(zip(*state["first_seen"], strict=True))
