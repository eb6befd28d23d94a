"""Assemble a learner from names: backbone + heads + buffer + method."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from buffers.open import open_store
from buffers.store import ReplayStore
from stream_cl.classifier import Classifier
from stream_cl.inputs import to_model_input
from stream_cl.labels import LabelTree
from stream_cl.learner import Learner
from stream_cl.methods import method_class
from stream_cl.models import build_backbone


def model_input_shape(record_shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Shape of one prepared model input for stored samples of ``record_shape`` and ``dtype``."""
    return tuple(to_model_input(torch.from_numpy(np.zeros((1, *record_shape), dtype=dtype))).shape[1:])


def build_learner(
    method: str,
    model: str,
    record_shape: tuple[int, ...],
    record_dtype: np.dtype,
    *,
    device: torch.device,
    seed: int = 0,
    buffer: ReplayStore | None = None,
    buffer_size: int = 500,
    buffer_spec: str = "memory",
    buffer_policy: str = "reservoir",
    width: int | None = None,
    hparams: dict[str, Any] | None = None,
    max_classes: int | None = None,
) -> Learner:
    """A ready learner; the seed fixes weight init, buffer and every method RNG.

    ``buffer`` is used as given (keeping labels as it was built to); otherwise ``buffer_spec``
    (``memory``, ``redis://...``) and ``buffer_policy`` open one of ``buffer_size`` samples
    (:func:`buffers.open.open_store`).
    An opened store gets the learner's label tree, so a Redis buffer shared by learners keeps
    labels by class path rather than by this learner's class indices; ``max_classes`` bounds the
    classes its draws may add to the tree (the run loop bounds those the stream brings).
    """
    torch.manual_seed(seed)
    backbone = build_backbone(model, model_input_shape(record_shape, record_dtype), width=width)
    classifier = Classifier(backbone, LabelTree(), device)
    store = buffer
    if store is None:
        store = open_store(
            buffer_spec,
            buffer_size,
            device=device,
            seed=seed,
            policy=buffer_policy,
            classes=classifier.tree,
            max_classes=max_classes,
        )
    return method_class(method)(classifier, store, **(hparams or {}))
