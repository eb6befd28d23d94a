"""The ReplayStore protocol and the fixed-shape ReplayBatch it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True, slots=True)
class ReplayBatch:
    """Samples drawn from a buffer. Every field is always present (empty tensors when n = 0).

    ``x`` keeps the stored dtype (uint8 images stay uint8); ``y`` is the class index within
    ``level``'s head; ``slot`` is where each sample lives, for policies that score samples.
    """

    x: torch.Tensor
    y: torch.Tensor
    level: torch.Tensor
    slot: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@runtime_checkable
class ReplayStore(Protocol):
    """Where replay samples live. ``add`` inserts a micro-batch through the store's policy."""

    capacity: int

    def add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None: ...

    def sample(self, n: int) -> ReplayBatch: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
