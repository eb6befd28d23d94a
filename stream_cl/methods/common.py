"""Small steps every method shares: label encoding and replay draws with head growth, the guard
against non-finite steps, and the state every learner saves."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from buffers.store import ReplayBatch, ReplayStore
from consumers.record import LabelPath
from stream_cl.classifier import Classifier
from stream_cl.labels import LabelTree
from stream_cl.learner import Observation, Prediction, StepStats

NON_FINITE_LOSS = "non_finite_loss"
"""``StepStats.rejected`` of a batch refused because learning it would make the loss or gradients non-finite."""


def encode_labels(
    model: Classifier, optimizer: torch.optim.Optimizer, paths: Sequence[LabelPath | None]
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]], torch.Tensor]:
    """Encode label paths to (level, y) device tensors, growing tree and heads for new classes.

    Returns ``(level, y, new_labels, learn_mask)``; unlabelled samples have level = y = -1.
    """
    level_np, y_np, new = model.tree.encode(paths)
    if new:
        model.sync(optimizer)
    level = torch.from_numpy(level_np).to(model.device)
    y = torch.from_numpy(y_np).to(model.device)
    return level, y, new, y >= 0


def draw_replay(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    buffer: ReplayStore,
    n: int,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    level: torch.Tensor | None = None,
) -> ReplayBatch:
    """Draw ``n`` replay samples, then insert ``x, y, level`` when given (one call: one Redis round trip).

    A Redis buffer shared by learners may replay classes only other learners have seen: the draw
    adds them to the label tree, and the heads (with the optimizer) are grown to match here.
    """
    replay = buffer.sample(n) if x is None else buffer.sample_then_add(n, x, y, level)
    model.sync(optimizer)
    return replay


def unsafe_batch(x: torch.Tensor, prediction: Prediction, labels: Sequence[LabelPath | None]) -> bool:
    """Whether a labelled row has a prepared input whose float32 squared norm, or a prediction, is not finite.

    Such a row would poison the model (the first layer's gradient is the input times the error, so
    an input of magnitude above ~1.8e19 already overflows the gradient norm), so the batch is refused
    before it reaches the buffer or a training forward (batch-norm statistics). One host sync.
    """
    learn = torch.tensor([path is not None for path in labels], device=x.device)
    per_row = x.flatten(1).float().square().sum(dim=1) + prediction.confidence.float().sum(dim=1)
    return not bool(torch.isfinite(torch.where(learn, per_row, 0.0)).all())


def refused(prediction: Prediction, tree: LabelTree, labels: Sequence[LabelPath | None]) -> Observation:
    """The observation of a batch refused as :data:`NON_FINITE_LOSS`: nothing learned.

    Labels are encoded without growing the tree (classes first seen in the refused batch stay
    unknown, -1), so the model keeps its shape.
    """
    known = [tree.lookup(path) if path is not None else (-1, -1) for path in labels]  # refusals are rare
    level, y = torch.tensor(known, dtype=torch.long, device=prediction.classes.device).reshape(-1, 2).T
    return Observation(prediction, level, y, StepStats(None, 0, 0, rejected=NON_FINITE_LOSS), [])


class StepGuard:
    """Takes an optimizer step only when the loss and the gradients are finite.

    :meth:`begin`, before a step's training forward passes, copies the modules' buffers (batch-norm
    running statistics, which a training-mode forward updates). :meth:`step`, after ``backward``,
    reads the loss and the float32 L2 norms of the gradients and of the floating-point buffers in
    one host sync (the ``loss.item()`` a step pays anyway): batch normalisation can squash an
    extreme batch into a finite loss while its running variance overflows. Then it steps, or
    refuses: gradients dropped, buffers restored, optimizer untouched.

    ``reduce``, set by a group of workers (:mod:`stream_cl.group`), averages the gradients and buffers
    over the group before the check and returns the loss summed over the group: every worker then
    steps or refuses alike.
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.reduce: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None
        self._buffers: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def begin(self) -> None:
        self._buffers = [b for module in self.modules for b in module.buffers()]
        self._saved = [b.detach().clone() for b in self._buffers]

    def step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
    ) -> float | None:
        """``optimizer.step()`` (through an enabled ``scaler``) and the loss; None when refused.

        With mixed precision, overflowing gradients are the scaler's to skip (it lowers its scale),
        so only the loss is checked.
        """
        checked = loss
        if self.reduce is not None:
            checked = self.reduce([p for group in optimizer.param_groups for p in group["params"]], loss)
        checks = [checked.detach().float().reshape(())]
        scaled = scaler is not None and scaler.is_enabled()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not scaled:
            checks.append(torch.nn.utils.get_total_norm(grads).float().to(checks[0].device))
        statistics = [b for b in self._buffers if b.is_floating_point()]
        if statistics:
            checks.append(torch.nn.utils.get_total_norm(statistics).float().to(checks[0].device))
        values = torch.stack(checks).tolist()
        if all(math.isfinite(v) for v in values):
            if scaled:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            return float(loss.detach()) if self.reduce is not None else values[0]
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self._buffers, self._saved, strict=True):
                buffer.copy_(saved)
        return None


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) RNG states, as tensors (loadable with weights_only=True)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def core_state(model: Classifier, optimizer: torch.optim.Optimizer, buffer: ReplayStore) -> dict[str, Any]:
    """What every method saves: label tree, model (backbone and heads), optimizer, buffer, torch RNGs."""
    return {
        "labels": model.tree.state_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "buffer": buffer.state_dict(),
        "rng": rng_state(),
    }


def load_core_state(
    state: dict[str, Any], model: Classifier, optimizer: torch.optim.Optimizer, buffer: ReplayStore
) -> None:
    """Restore :func:`core_state`; the heads are grown to the saved tree before their weights load."""
    model.tree.load_state_dict(state["labels"])
    model.sync(optimizer)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    buffer.load_state_dict(state["buffer"])
    set_rng_state(state["rng"])
