"""Small steps every method shares: label encoding with head growth, and RNG state capture."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stream_cl.classifier import Classifier
from stream_cl.labels import LabelPath


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
