"""Small steps every method shares: label encoding and replay draws with head growth, the guard
against non-finite steps, and the state every learner saves."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import optimizer as optimizer_module

from buffers.store import ReplayBatch, ReplayStore
from consumers.record import LabelPath
from stream_cl.classifier import Classifier
from stream_cl.inputs import on_device
from stream_cl.labels import LabelTree
from stream_cl.learner import Observation, Prediction, StepStats

NON_FINITE_LOSS = "non_finite_loss"
"""``StepStats.rejected`` of a batch refused because learning it would make the loss or gradients non-finite."""
FLOAT32_MAX = torch.finfo(torch.float32).max
"""Largest finite float32: a sum the host takes in float64 above it would have overflowed on the device."""
EXTREME_INPUT = "extreme_input"
"""``StepStats.rejected`` of a batch with a labelled input far larger than the usual ones (see :class:`StepGuard`)."""


_BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


def require_number(name: str, value: Any, *, integer: bool = False, **bounds: float) -> None:
    """Raise ValueError unless hyper-parameter ``name`` is a finite number (an int where ``integer``) within
    ``bounds`` (``gt``, ``ge``, ``lt``, ``le``): a NaN passes a plain ``lr <= 0`` test and an infinity passes
    ``lr > 0``, and either then turns every labelled record into a non-finite-loss dead letter.

    >>> require_number("tau", 0.5, ge=0, lt=1)
    >>> require_number("lr", float("nan"), gt=0)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a finite number, got nan
    """
    kind = numbers.Integral if integer else numbers.Real  # NumPy scalars too
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'}, got {value!r}")
    rules = [(_BOUNDS[op], bound) for op, bound in bounds.items()]
    if not all(compare(value, bound) for (compare, _), bound in rules):
        allowed = " and ".join(f"{symbol} {bound}" for (_, symbol), bound in rules)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def encode_labels(
    model: Classifier, optimizer: torch.optim.Optimizer, paths: Sequence[LabelPath | None]
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]], torch.Tensor]:
    """Encode label paths to (level, y) device tensors, growing tree and heads for new classes.

    Returns ``(level, y, new_labels, learn_mask)``; unlabelled samples have level = y = -1.
    """
    level, y, new = encode_targets(model, optimizer, paths)
    return level, y, new, y >= 0


def encode_targets(
    model: Classifier, optimizer: torch.optim.Optimizer, paths: Sequence[LabelPath | None]
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """:func:`encode_labels` without the learn mask, for a method that needs it only when some label is missing."""
    level_np, y_np, new = model.tree.encode(paths)
    if new:
        model.sync(optimizer)
    level, y = torch.from_numpy(level_np), torch.from_numpy(y_np)
    if model.device.type != "cpu":
        level, y = level.to(model.device), y.to(model.device)
    return level, y, new


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


def refused(prediction: Prediction, tree: LabelTree, labels: Sequence[LabelPath | None], reason: str) -> Observation:
    """The observation of a batch refused for ``reason`` before anything changed: nothing learned.

    Labels are encoded without growing the tree (classes first seen in the refused batch stay
    unknown, -1), so the model keeps its shape.
    """
    known = [tree.lookup(path) if path is not None else (-1, -1) for path in labels]  # refusals are rare
    level, y = torch.tensor(known, dtype=torch.long, device=prediction.classes.device).reshape(-1, 2).T
    return Observation(prediction, level, y, StepStats(None, 0, 0, rejected=reason), [])


class StepGuard:
    """Takes an optimizer step only when the loss and the gradients are finite; refuses extreme inputs first.

    :meth:`begin`, before a step's training forward passes, copies the modules' buffers (batch-norm
    running statistics, which a training-mode forward updates). :meth:`step`, after ``backward``,
    reads the loss and the float32 L2 norms of the gradients and of the floating-point buffers in
    one host sync (the ``loss.item()`` a step pays anyway): batch normalisation can squash an
    extreme batch into a finite loss while its running variance overflows. Then it steps, or
    refuses (:attr:`reason` says why): gradients dropped, buffers restored, optimizer untouched.

    ``reduce``, set by a group of workers (:mod:`stream_cl.group`), averages the gradients and buffers
    over the group before the check and returns the loss summed over the group: every worker then
    steps or refuses alike.

    A finite but extreme input (say 1e12) gives a finite loss and a gradient millions of times the
    usual one; one such step would throw the weights so far that every later batch overflows. So
    :meth:`screen` refuses, before the batch reaches the buffer or a training forward, a labelled row
    whose input is not finite or, after ``warmup`` batches, whose input norm is more than
    ``input_spike`` times the usual one (:data:`EXTREME_INPUT`). "Usual" is the running geometric mean
    of the largest input norm of accepted batches; it is part of the learner's state, so a resumed
    learner decides as an uninterrupted one would. (Gradient norms are no such yardstick in continual
    learning: a head with one class has a zero gradient, and the next class multiplies it without bound.)
    """

    def __init__(self, *modules: nn.Module, input_spike: float = 1e4, warmup: int = 3) -> None:
        self.modules = modules
        self.input_spike, self.warmup = input_spike, warmup
        self.reason: str | None = None
        self._input = _RunningLogMean()
        self.reduce: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None
        self._buffers: list[torch.Tensor] | None = None
        self._saved: list[torch.Tensor] = []

    def screen(self, x: torch.Tensor, prediction: Prediction, labels: Sequence[LabelPath | None]) -> str | None:
        """Why the batch must be refused before anything changes, or None. One host sync.

        Only labelled rows count (the others are only predicted): a non-finite float32 input norm
        (any value above ~1.8e19 in magnitude) or prediction is :data:`NON_FINITE_LOSS`; an input norm
        far above the usual is :data:`EXTREME_INPUT`.
        """
        n_learn = len(labels) - labels.count(None)
        if not n_learn:
            return None
        norms = torch.linalg.vector_norm(x.flatten(1).float(), dim=1)  # float32: inf where the squares overflow
        n = len(labels)
        learn = None
        if n_learn == n:  # every row counts: the squared norms and the confidences are summed on the host
            checked = prediction.confidence.reshape(-1)
        else:  # a mask only where some rows are unlabelled: building it costs more than the sums
            learn = [path is not None for path in labels]
            rows = norms.square() + prediction.confidence.float().sum(dim=1)
            checked = torch.where(torch.tensor(learn, device=x.device), rows, 0.0)
        values = torch.cat([norms, checked]).tolist()  # the one host sync
        input_norms = values[:n]
        total = sum(values[n:]) + (sum(v * v for v in input_norms) if learn is None else 0.0)
        if not total <= FLOAT32_MAX:  # as a float32 sum would overflow; NaN fails the comparison too
            return NON_FINITE_LOSS
        if learn is not None:
            input_norms = [v for v, keep in zip(input_norms, learn, strict=True) if keep]
        largest = max(input_norms)
        if self._input.count >= self.warmup and not self._input.within(largest, self.input_spike):
            return EXTREME_INPUT
        self._input.add(largest)
        return None

    def begin(self) -> None:
        if self._buffers is None:  # taken once: buffers are registered at construction (grown heads are plain linears)
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
        device = checks[0].device
        scaled = scaler is not None and scaler.is_enabled()
        groups = []  # per group of tensors (gradients, floating-point buffers), how many norms follow the loss
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for tensors in (grads if not scaled else [], [b for b in self._buffers or () if b.is_floating_point()]):
            if tensors:
                norms = _norms(tensors, device)
                checks.extend(norms)
                groups.append(len(norms))
        values = torch.stack(checks).tolist()  # the one host sync
        self.reason = None if _finite(values, groups) else NON_FINITE_LOSS
        if self.reason is None:
            if scaled:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer_step(optimizer)
            return float(loss.detach()) if self.reduce is not None else values[0]
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self._buffers, self._saved, strict=True):
                buffer.copy_(saved)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"input": self._input.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._input.load(state["input"])


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, with plain SGD updated directly: the same ``p -= lr * grad`` per parameter.

    ``SGD.step``'s wrappers (profiling range, compile guards, hook and grad-mode switches) cost a small model
    as much as the update itself. Plain means: exactly ``torch.optim.SGD``, no momentum, weight decay, Nesterov,
    maximize, differentiable or fused update, a float learning rate, no step hooks, dense gradients. Anything
    else goes through ``optimizer.step()``.
    """
    if not _plain_sgd(optimizer):
        optimizer.step()
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:  # SGD's own foreach form: per tensor, the add_ its single-tensor form runs
                torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its per-call profiling range and compile guard."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    return (
        type(optimizer) is torch.optim.SGD
        and not optimizer._optimizer_step_pre_hooks
        and not optimizer._optimizer_step_post_hooks
        and not optimizer_module._global_optimizer_pre_hooks
        and not optimizer_module._global_optimizer_post_hooks
        and all(
            not g["momentum"]
            and not g["weight_decay"]
            and not g["nesterov"]
            and not g["maximize"]
            and not g.get("differentiable")
            and not g.get("fused")
            and type(g["lr"]) is float
            and not any(p.grad is not None and p.grad.is_sparse for p in g["params"])
            for g in optimizer.param_groups
        )
    )


def _norms(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Float32 L2 norms on ``device`` whose squares sum to the squared norm of all ``tensors`` together: one per
    tensor (one ``_foreach_norm``, no grouping by device and dtype) when they share the device and float32,
    else the one total of ``torch.nn.utils.get_total_norm``."""
    if device.type in ("cpu", "cuda") and all(
        type(t) is torch.Tensor and t.device == device and t.dtype == torch.float32 for t in tensors
    ):
        return list(torch._foreach_norm(tensors))
    return [on_device(torch.nn.utils.get_total_norm(tensors).float(), device)]


def _finite(values: list[float], groups: list[int]) -> bool:
    """Whether the loss ``values[0]`` is finite and so is the float32 L2 norm of each group of norms after it
    (its sum of squares within float32's range, as ``get_total_norm`` would compute it)."""
    if not math.isfinite(values[0]):
        return False
    start = 1
    for count in groups:
        if not sum(v * v for v in values[start : start + count]) <= FLOAT32_MAX:  # NaN fails the comparison
            return False
        start += count
    return True


class _RunningLogMean:
    """The mean of the logs of a series of values, each taken as at least 1 (a blank input must not make every
    ordinary one look extreme): an average over the first 100, then a moving one."""

    def __init__(self) -> None:
        self.count, self.log_mean = 0, 0.0

    def within(self, value: float, factor: float) -> bool:
        return math.log(max(value, 1.0)) <= self.log_mean + math.log(factor)

    def add(self, value: float) -> None:
        self.count += 1
        self.log_mean += (math.log(max(value, 1.0)) - self.log_mean) / min(self.count, 100)

    def state(self) -> list[float]:
        return [float(self.count), self.log_mean]

    def load(self, state: list[float]) -> None:
        self.count, self.log_mean = int(state[0]), float(state[1])


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


def core_state(
    model: Classifier, optimizer: torch.optim.Optimizer, buffer: ReplayStore, guard: StepGuard
) -> dict[str, Any]:
    """What every method saves: label tree, model (backbone and heads), optimizer, buffer, step guard, torch RNGs."""
    return {
        "labels": model.tree.state_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "buffer": buffer.state_dict(),
        "guard": guard.state_dict(),
        "rng": rng_state(),
    }


def load_core_state(
    state: dict[str, Any], model: Classifier, optimizer: torch.optim.Optimizer, buffer: ReplayStore, guard: StepGuard
) -> None:
    """Restore :func:`core_state`; the heads are grown to the saved tree before their weights load."""
    model.tree.load_state_dict(state["labels"])
    model.sync(optimizer)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    buffer.load_state_dict(state["buffer"])
    if "guard" in state:  # checkpoints written before the spike guard start it afresh
        guard.load_state_dict(state["guard"])
    set_rng_state(state["rng"])
