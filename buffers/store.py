"""The ReplayStore protocol, the ReplayBatch and BufferStats it returns, the class key of a sample, and ClassNames."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

EMPTY = -1
"""Class key of a slot that holds nothing yet."""


def class_keys(y: np.ndarray, level: np.ndarray) -> np.ndarray:
    """One int64 per sample naming its class ``(level, y)``: ``level * 2**32 + y``."""
    return (np.asarray(level, dtype=np.int64) << 32) | np.asarray(y, dtype=np.int64)


def split_key(key: int) -> tuple[int, int]:
    """``(level, y)`` of a class key."""
    return int(key) >> 32, int(key) & 0xFFFFFFFF


class ClassNames(Protocol):
    """A learner's class numbering: local ``(level, index)`` <-> label path (``stream_cl.labels.LabelTree``).

    A store shared by learners that number classes differently keeps labels by path and maps
    them to each learner's own indices with this; ``encode`` adds the classes it has not seen, or
    gives ``(-1, -1)`` for a class it does not take (a worker of a group takes only the classes the
    group added: :class:`stream_cl.group.KnownClasses`), whose samples a draw then leaves out.
    """

    def path(self, level: int, index: int) -> tuple[str, ...]: ...

    def lookup(self, path: tuple[str, ...]) -> tuple[int, int]: ...

    def encode(
        self, paths: Sequence[tuple[str, ...] | None]
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]: ...


@runtime_checkable
class GrowingClassNames(ClassNames, Protocol):
    """A numbering whose ``encode`` adds the classes it has not seen (``LabelTree``), with the checks a path
    must pass first: ``problem`` (why it cannot be learned: too deep, or a known class under another parent;
    None if it can) and ``sizes`` (classes per level, for a class limit). A store adds a class drawn from a
    shared buffer only if it passes them, as the run loop screens a stream's labels.
    """

    @property
    def sizes(self) -> list[int]: ...

    def problem(self, path: tuple[str, ...]) -> str | None: ...


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

    @staticmethod
    def empty(device: str | torch.device = "cpu") -> ReplayBatch:
        none = torch.empty(0, dtype=torch.long, device=device)
        return ReplayBatch(torch.empty(0, device=device), none, none, none)


@dataclass(frozen=True, slots=True)
class BufferStats:
    """A store's state for metrics (:meth:`ReplayStore.stats`).

    ``nbytes``: sample and label payload bytes. ``errors``: failed operations since the store was
    opened, cumulative (always 0 in memory; a Prometheus counter adds the difference between two
    reads). ``class_counts``: stored samples per class ``(level, y)``, filled only when asked for.
    ``corrupt``: drawn samples left out because their stored entry could not be read (bytes of the
    wrong size, an unreadable label or one the learner's tree refuses), cumulative (0 in memory).
    ``repairs``: counter keys found damaged or foreign and rebuilt from the samples stored, cumulative.
    """

    size: int
    capacity: int
    nbytes: int
    errors: int
    class_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    corrupt: int = 0
    repairs: int = 0


@runtime_checkable
class ReplayStore(Protocol):
    """Where replay samples live. ``add`` inserts a micro-batch through the store's policy.

    ``add`` returns the slot each sample went to (-1: not kept). ``sample_then_add`` draws
    ``n`` samples from the buffer as it is, then inserts the batch: what a replay step needs,
    in one round trip for remote stores. ``stats(classes=True)`` also counts the stored samples
    per class, which costs a Redis store a round trip (ask at probe time, not per step).
    """

    capacity: int

    def add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> np.ndarray: ...

    def sample(self, n: int) -> ReplayBatch: ...

    def sample_then_add(self, n: int, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> ReplayBatch: ...

    def stats(self, *, classes: bool = False) -> BufferStats: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
