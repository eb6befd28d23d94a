"""OnPro (Wei et al., ICCV 2023): online prototype learning with OCM contrast, OPE and APF."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from buffers.store import ReplayStore
from stream_cl.classifier import Classifier
from stream_cl.inputs import to_model_input
from stream_cl.learner import Batch, Observation, Prediction, StepStats
from stream_cl.methods.common import (
    StepGuard,
    core_state,
    draw_replay,
    encode_labels,
    load_core_state,
    refused,
    require_number,
)
from stream_cl.methods.onpro_apf import Mixed, apf_batch, unmixed
from stream_cl.methods.onpro_augment import VIEW_COUNTS, random_view, rotation_views
from stream_cl.methods.onpro_losses import class_keys, contrast_groups, ins_loss, ins_similarity, mixup_ce, proto_loss


class OnPro:
    """Online Prototype learning (OnPro) over a growing label space.

    Per step: L = L_CE + L_INS + L_OPE(new) + L_OPE(seen) (spec §1.7). Task 0 trains CE on T(x);
    later tasks train CE only on the APF-mixed replay batch. Prediction is the head argmax.
    The stream batch is inserted into the buffer after the step. A batch with a non-finite input
    or prediction is refused before the step, and a step whose loss or gradients are non-finite is
    not taken (:class:`~stream_cl.methods.common.StepGuard`; task bookkeeping and APF means stay).

    Task boundaries: a stream has no task ids, so a batch that brings a class never seen before
    opens a new task, unless the current task began fewer than ``task_grace`` learning steps ago
    (then the class joins it: with batches of 10, a task's classes trickle in over a few steps).
    ``task_grace=0`` makes every new class open a task. Task 0 lasts until the second set of
    classes arrives; "first batch of a task" (APF skipped) is the step that opened it.

    Parameters
    ----------
    model, buffer
        Backbone with level heads; replay store.
    lr, weight_decay
        Adam (β = 0.9, 0.99) over backbone, heads and projector.
    rotations
        OCM rotation views, one of 1, 2, 4, 8, 16 (see ``onpro_augment.view_blocks``); cost knob.
    ins_temperature, proto_temperature
        τ of the instance-wise (0.07) and prototype (0.5) contrast.
    sim_scale
        λ_sim of the INS similarity after task 0 (1.0 for CIFAR-100, 0.5 for CIFAR-10).
    mixup_base_rate, mixup_p, mixup_alpha, mixup_lambda_max
        APF: share of uniformly mixed replay samples, mixing probability, Beta α, uniform λ cap.
    replay_cap, replay_per_class
        Replay batch m = min(replay_cap, replay_per_class · classes seen); cost knob.
    apf_pool
        Buffer samples APF draws pair members from (None: the whole buffer).
    proj_dim
        Projector output size, ≤ the backbone's feature size (None: min(128, feature size)).
    task_grace
        Steps after a task start during which new classes join that task.
    amp
        Mixed precision; only takes effect on CUDA (CPU steps run in float32).
    amp_dtype
        ``"float16"`` (with a gradient scaler) or ``"bfloat16"`` (no scaler needed: float32's range).
    iterations
        Optimizer steps per incoming batch (>= 1), each with its own replay draw (and APF mix): OnPro
        given the updates of a method that steps more often (the paper's OnPro: 1). The batch enters the
        buffer after the last.
    seed
        Seed of the method's generator (None: drawn from torch's global RNG).
    """

    name = "onpro"

    def __init__(
        self,
        model: Classifier,
        buffer: ReplayStore,
        *,
        lr: float = 5e-4,
        weight_decay: float = 1e-4,
        rotations: int = 16,
        ins_temperature: float = 0.07,
        proto_temperature: float = 0.5,
        sim_scale: float = 1.0,
        mixup_base_rate: float = 0.9,
        mixup_p: float = 0.2,
        mixup_alpha: float = 0.4,
        mixup_lambda_max: float = 0.6,
        replay_cap: int = 64,
        replay_per_class: int = 7,
        apf_pool: int | None = None,
        proj_dim: int | None = None,
        task_grace: int = 5,
        amp: bool = True,
        amp_dtype: str = "float16",
        iterations: int = 1,
        seed: int | None = None,
    ) -> None:
        feature_dim = model.backbone.out_dim
        proj_dim = min(128, feature_dim) if proj_dim is None else proj_dim
        require_number("lr", lr, gt=0)
        require_number("ins_temperature", ins_temperature, gt=0)
        require_number("proto_temperature", proto_temperature, gt=0)
        require_number("sim_scale", sim_scale, gt=0)
        require_number("weight_decay", weight_decay, ge=0)
        require_number("mixup_base_rate", mixup_base_rate, ge=0, le=1)
        require_number("mixup_p", mixup_p, ge=0, le=1)
        require_number("mixup_alpha", mixup_alpha, gt=0, le=1)
        require_number("mixup_lambda_max", mixup_lambda_max, gt=0, le=1)
        require_number("replay_cap", replay_cap, integer=True, ge=0)
        require_number("replay_per_class", replay_per_class, integer=True, ge=1)
        if apf_pool is not None:
            require_number("apf_pool", apf_pool, integer=True, ge=1)
        require_number("proj_dim", proj_dim, integer=True, ge=1, le=feature_dim)  # at most the backbone's features
        require_number("task_grace", task_grace, integer=True, ge=0)
        require_number("iterations", iterations, integer=True, ge=1)
        if seed is not None:
            require_number("seed", seed, integer=True)
        require_number("rotations", rotations, integer=True)
        if rotations not in VIEW_COUNTS:
            raise ValueError(f"rotations must be one of {VIEW_COUNTS}, got {rotations!r}")
        if amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be float16 or bfloat16, got {amp_dtype!r}")
        self.model, self.buffer, self.labels = model, buffer, model.tree
        self.lr, self.weight_decay, self.rotations = lr, weight_decay, rotations
        self.ins_temperature, self.proto_temperature, self.sim_scale = ins_temperature, proto_temperature, sim_scale
        self.mixup_base_rate, self.mixup_p, self.mixup_alpha = mixup_base_rate, mixup_p, mixup_alpha
        self.mixup_lambda_max, self.replay_cap, self.replay_per_class = mixup_lambda_max, replay_cap, replay_per_class
        self.apf_pool, self.proj_dim, self.task_grace, self.iterations = apf_pool, proj_dim, task_grace, iterations
        self.amp = amp and model.device.type == "cuda"
        self.amp_dtype = getattr(torch, amp_dtype)
        self.projector = nn.Linear(feature_dim, proj_dim).to(model.device)
        params = [*model.parameters(), *self.projector.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.guard = StepGuard(model, self.projector)
        self.seed = int(torch.randint(2**62, (1,)).item()) if seed is None else seed
        self.gen = torch.Generator().manual_seed(self.seed)
        self.task, self.task_age, self.steps = 0, 0, 0
        self.mu_keys: torch.Tensor | None = None  # previous step's prototype classes and means (APF)
        self.mu: torch.Tensor | None = None

    def observe(self, batch: Batch) -> Observation:
        x_raw = batch.x.to(self.model.device, non_blocking=True)
        x = to_model_input(x_raw)
        if x.dim() != 4:
            raise ValueError(f"OnPro needs image inputs (N, C, H, W), got shape {tuple(x.shape)}")
        prediction = self.model.predict_prepared(x)
        reason = self.guard.screen(x, prediction, batch.labels)
        if reason is not None:
            return refused(prediction, self.labels, batch.labels, reason)
        level, y, new, learn = encode_labels(self.model, self.optimizer, batch.labels)
        if not learn.any():
            return Observation(prediction, level, y, StepStats(None, 0, 0), new)
        before = self.task, self.task_age, self.steps  # restored if the batch is refused
        first_of_task = self._track_task(bool(new))
        xs, keys = x[learn], class_keys(level[learn], y[learn])
        seen = sum(self.labels.sizes)
        self.model.train()
        values, replayed = [], 0
        for it in range(self.iterations):  # compute-matched runs: each further step replays a fresh draw
            value, n_replayed = self._step(xs, keys, first_of_task and it == 0, seen)
            if value is None:  # a later step refused: the batch is learned by the steps before it
                break
            values.append(value)
            replayed += n_replayed
        if not values:
            self.task, self.task_age, self.steps = before
            return Observation(prediction, level, y, StepStats(None, 0, 0, rejected=self.guard.reason), new)
        self.buffer.add(x_raw[learn], y[learn], level[learn])
        return Observation(prediction, level, y, StepStats(sum(values) / len(values), int(learn.sum()), replayed), new)

    def _step(self, xs: torch.Tensor, keys: torch.Tensor, first_of_task: bool, seen: int) -> tuple[float | None, int]:
        """One optimizer step on the stream rows ``xs`` and a replay draw: (loss, replayed), loss None if refused."""
        before = self.mu_keys, self.mu  # restored if the step is refused
        # Replay: task 0 replays up to replay_cap samples for L_seen only; later tasks draw
        # m = min(cap, per_class · seen) and (after a task's first step) mix them with APF.
        m = self.replay_cap if self.task == 0 else min(self.replay_cap, self.replay_per_class * seen)
        use_apf = self.task > 0 and not first_of_task and self.mu is not None
        pool = draw_replay(
            self.model, self.optimizer, self.buffer, max(m, self.apf_pool or len(self.buffer)) if use_apf else m
        )
        has_replay = m > 0 and len(pool) > 0
        rx = to_model_input(pool.x[:m].to(self.model.device)) if has_replay else None
        rkeys = class_keys(pool.level[:m], pool.y[:m]).to(self.model.device) if has_replay else None
        mixed = None
        if rx is not None and self.task > 0:
            mixed = self._apf(rx, rkeys, pool) if use_apf else unmixed(rx, rkeys)

        self.guard.begin()
        with self._autocast():
            # L_INS on the stream (and on the mixed replay batch), one forward; L_OPE(new) from block 0.
            views = rotation_views(xs, self.rotations)
            n_stream = 2 * views.shape[0]
            inputs = [views, random_view(views, self.gen)]
            if mixed is not None:
                replay_views = rotation_views(mixed.x, self.rotations)
                inputs += [replay_views, random_view(replay_views, self.gen)]
            features = self.model(torch.cat(inputs))
            h, z = F.normalize(features.float(), dim=1), F.normalize(self.projector(features).float(), dim=1)
            offset = int(torch.randint(features.shape[1] - self.proj_dim + 1, (1,), generator=self.gen))
            scale = 1.0 if self.task == 0 else self.sim_scale
            groups = contrast_groups(keys, keys, torch.zeros_like(keys, dtype=torch.float32), self.rotations)
            sim = ins_similarity(z[:n_stream], h[:n_stream], offset, scale)
            loss_ins = ins_loss(sim, groups.repeat(2), temperature=self.ins_temperature, stream=True)
            half = n_stream // 2
            loss_new, _, _ = self._ope(z[: len(xs)], z[half : half + len(xs)], keys)
            loss = loss_ins + loss_new

            if mixed is not None:
                offset = int(torch.randint(features.shape[1] - self.proj_dim + 1, (1,), generator=self.gen))
                groups = contrast_groups(mixed.a, mixed.b, mixed.lam, self.rotations)
                sim = ins_similarity(z[n_stream:], h[n_stream:], offset, scale)
                loss = loss + ins_loss(sim, groups.repeat(2), temperature=self.ins_temperature, stream=False)
                logits = self.model.logits(self.model(random_view(mixed.x, self.gen)))
                loss = loss + self._ce(logits, mixed.a, mixed.b, mixed.lam)
            elif self.task == 0:
                logits = self.model.logits(self.model(random_view(xs, self.gen)))
                loss = loss + self._ce(logits, keys, keys, torch.zeros_like(keys, dtype=torch.float))

            # L_OPE(seen) on the raw replay batch; its class means steer the next step's APF.
            if rx is not None:
                zr = F.normalize(self.projector(self.model(torch.cat([rx, random_view(rx, self.gen)]))).float(), dim=1)
                loss_seen, self.mu_keys, self.mu = self._ope(zr[: len(rx)], zr[len(rx) :], rkeys)
                loss = loss + loss_seen

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        value = self.guard.step(loss, self.optimizer, self.scaler)
        if value is None:
            self.mu_keys, self.mu = before
        return value, 0 if rx is None else len(rx)

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.model.predict(x)

    def _track_task(self, new_classes: bool) -> bool:
        """Advance the task bookkeeping by one learning step; True if this step opens a task."""
        opens = new_classes and self.steps > 0 and self.task_age >= self.task_grace
        if opens:
            self.task, self.task_age = self.task + 1, 0
        self.steps, self.task_age = self.steps + 1, self.task_age + 1
        return opens

    def _ope(
        self, z1: torch.Tensor, z2: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_OPE of two views' projections of samples with class ``keys``, and their class means (for APF)."""
        return proto_loss(z1, z2, keys, temperature=self.proto_temperature)

    def _ce(self, logits: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """L_CE of samples mixed as (1 − λ)·a + λ·b (unmixed: b = a, λ = 0)."""
        return mixup_ce([lg.float() for lg in logits], a, b, lam)

    def _apf(self, rx: torch.Tensor, rkeys: torch.Tensor, pool: Any) -> Mixed:
        pool_x = to_model_input(pool.x.to(self.model.device))
        pool_keys = class_keys(pool.level, pool.y).to(self.model.device)
        return apf_batch(
            rx, rkeys, pool_x, pool_keys, self.mu_keys, self.mu, self.gen,
            base_rate=self.mixup_base_rate, p=self.mixup_p, alpha=self.mixup_alpha, lam_max=self.mixup_lambda_max,
        )  # fmt: skip

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {
            **core_state(self.model, self.optimizer, self.buffer, self.guard),
            "projector": self.projector.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {"task": self.task, "task_age": self.task_age, "steps": self.steps},
            "mu": None if self.mu is None else {"keys": self.mu_keys.cpu(), "means": self.mu.cpu()},
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projector.load_state_dict(state["projector"])
        load_core_state(state, self.model, self.optimizer, self.buffer, self.guard)
        self.scaler.load_state_dict(state["scaler"])
        progress = state["progress"]
        self.task, self.task_age, self.steps = progress["task"], progress["task_age"], progress["steps"]
        mu = state["mu"]
        self.mu_keys = None if mu is None else mu["keys"].to(self.model.device)
        self.mu = None if mu is None else mu["means"].to(self.model.device)
        self.gen.set_state(state["gen"])
