"""Small steps every method shares: label encoding with head growth, and the state every learner saves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from buffers.store import ReplayStore
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
