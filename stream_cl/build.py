"""Assemble a learner from names: backbone + heads + buffer + method."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from buffers.memory import MemoryStore
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
    width: int | None = None,
    hparams: dict[str, Any] | None = None,
) -> Learner:
    """A ready learner; the seed fixes weight init, buffer and every method RNG."""
    torch.manual_seed(seed)
    backbone = build_backbone(model, model_input_shape(record_shape, record_dtype), width=width)
    classifier = Classifier(backbone, LabelTree(), device)
    store = buffer if buffer is not None else MemoryStore(buffer_size, device=device, seed=seed)
    return method_class(method)(classifier, store, **(hparams or {}))
