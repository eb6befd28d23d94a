"""Value types that flow out of every source: messages, records, dead letters, polls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

LabelPath = tuple[str, ...]
"""A label given from coarse to fine: ``("dog",)`` or ``("animal", "dog")``."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a sample sits in its stream: Kafka topic/partition/offset, or file/0/index, and, for a message
    carrying several samples (wire format 2), the sample's ``index`` among the message's ``count``."""

    stream: str
    partition: int
    offset: int
    index: int = 0
    count: int = 1

    @property
    def ends_message(self) -> bool:
        """Whether this is the message's last sample: once it is processed, the message's offset is done."""
        return self.index == self.count - 1


@dataclass(frozen=True, slots=True)
class Message:
    """One raw message, as a broker or a recorded-stream file holds it."""

    position: Position
    timestamp: float
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded sample.

    ``x`` is an image as uint8 HWC, a float32 CHW image, or a float32 feature vector.
    ``label`` is ``None`` for a record that must be predicted, never learned. ``message`` is
    the raw message it came from, kept so a record rejected later still reaches the dead-letter
    topic byte for byte (``x`` usually shares its buffer, so this costs no copy); for a sample of a
    batched message its position is the sample's, so the dead letter can name the sample.
    """

    id: str
    x: np.ndarray
    label: LabelPath | None
    position: Position
    timestamp: float
    message: Message


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that cannot be learned, kept whole with the reason why."""

    message: Message
    reason: str
    detail: str = ""


@dataclass(slots=True)
class Poll:
    """What one ``Source.poll`` returns: good records and dead letters, in stream order."""

    records: list[Record] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) + len(self.dead_letters)

    def positions(self) -> list[Position]:
        """Positions of everything polled, good or bad, for committing."""
        return [r.position for r in self.records] + [d.message.position for d in self.dead_letters]


def label_path(label: str | Sequence[str] | None) -> LabelPath | None:
    """Normalise a label (``"dog"``, ``["animal", "dog"]`` or ``None``) to a tuple path.

    Raises
    ------
    ValueError
        If the label is not a non-empty string or a non-empty list (or tuple) of non-empty strings.

    Examples
    --------
    >>> label_path("dog"), label_path(["animal", "dog"]), label_path(None)
    (('dog',), ('animal', 'dog'), None)
    """
    if label is None:
        return None
    if isinstance(label, str):
        parts: tuple = (label,)
    elif isinstance(label, list | tuple):  # not any iterable: a dict would give its keys
        parts = tuple(label)
    else:
        parts = ()
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"label must be a non-empty string or list of strings, got {label!r:.80}")
    return parts


def message_bytes(message: Message) -> int:
    """A message's bytes: value, key and headers."""
    return len(message.value) + len(message.key or b"") + sum(len(name) + len(value) for name, value in message.headers)


def held_bytes(entry: Record | DeadLetter | HasMessage) -> int:
    """Memory an entry holds: its share of its message's bytes (value, key and headers: the samples of a message
    share them), and a record's array unless that is a view on those bytes (as the binary encoding's is)."""
    message = entry.message
    size = message_bytes(message) // max(1, message.position.count)
    if isinstance(entry, Record):
        base = entry.x
        while isinstance(base, np.ndarray):
            base = base.base
        if base is not message.value:
            size += entry.x.nbytes
    return size


class HasMessage(Protocol):
    """Anything decoded from one message that keeps it (a label record, say)."""

    @property
    def message(self) -> Message: ...
