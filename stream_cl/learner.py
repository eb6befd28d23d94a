"""The Learner contract: test-then-train on micro-batches, predict at any time, resume from state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from buffers.store import ReplayStore
from consumers.record import LabelPath
from stream_cl.labels import LabelTree


@dataclass(frozen=True, slots=True)
class Batch:
    """A micro-batch as the learner sees it: stacked raw inputs and one label path (or None) each."""

    x: torch.Tensor
    labels: Sequence[LabelPath | None]


@dataclass(frozen=True, slots=True)
class Prediction:
    """Per-level predictions: ``classes[i, l]`` (-1 where level l has no class yet) and confidence."""

    classes: torch.Tensor
    confidence: torch.Tensor

    def paths(self, tree: LabelTree) -> list[list[tuple[str, float]]]:
        """Per sample, the predicted ``(class name, confidence)`` of each level."""
        classes, conf = self.classes.tolist(), self.confidence.tolist()
        return [
            [(tree.names[lvl][c], round(p, 6)) for lvl, (c, p) in enumerate(zip(row, prow, strict=True)) if c >= 0]
            for row, prow in zip(classes, conf, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one ``observe`` did: the loss (None if nothing was learned) and sample counts.

    ``rejected`` is the reason the learner refused the batch's labelled records (then
    ``n_learned = 0``): ``"non_finite_loss"`` when learning them would make the loss or the
    gradients non-finite. The caller dead-letters those records with that reason.
    """

    loss: float | None
    n_learned: int
    n_replayed: int
    rejected: str | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """``observe``'s result: the predictions made *before* learning, the targets and step stats.

    ``level``/``y`` are the encoded labels (-1 for unlabelled samples), so callers score the
    predictions without re-encoding; ``new_labels`` lists ``(level, name)`` classes first seen here.
    """

    prediction: Prediction
    level: torch.Tensor
    y: torch.Tensor
    stats: StepStats
    new_labels: list[tuple[int, str]]


@runtime_checkable
class Learner(Protocol):
    """An online continual learner.

    ``observe`` is prequential: every sample is predicted before the learner trains on it.
    ``predict`` is pure and valid before the first ``observe``. ``state_dict`` holds everything
    needed to resume (model, optimizer, label tree, in-process buffer, RNG states), as tensors and
    plain containers only, so checkpoints load with ``torch.load(weights_only=True)``.

    A learner whose optimizer has a learning rate may set ``schedules_lr`` True when it moves that rate as it
    learns: a restart then keeps the checkpoint's rate instead of the configured one.
    """

    name: str
    labels: LabelTree
    buffer: ReplayStore

    def observe(self, batch: Batch) -> Observation: ...

    def predict(self, x: torch.Tensor) -> Prediction: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LearnerFactory = Callable[[tuple[int, ...], np.dtype], Learner]
"""Builds the learner from the first record's input shape and dtype."""


@dataclass
class RunState:
    """What a run carries between batches and restarts; ``learner`` is built on the first record."""

    learner: Learner | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: np.dtype | None = None
