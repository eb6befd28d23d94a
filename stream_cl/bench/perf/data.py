"""The benchmark's streams: one labelled array set per case, written as wire-format messages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from consumers.datasets import load_cifar100
from consumers.record import Message, Position
from consumers.recorded import write_messages
from consumers.wire import encode_batch_binary, encode_binary


@dataclass(frozen=True)
class Case:
    """One benchmark case: a method on a model, fed ``n_records`` of one stream in micro-batches.

    ``kind`` is ``"images"`` (3x32x32 uint8, CIFAR-100 when a data directory is given, else random
    pixels) or ``"features"`` (``dim`` float32 Gaussian class clusters).
    """

    name: str
    method: str
    model: str
    kind: str
    n_records: int
    n_classes: int = 100
    dim: int = 128
    batch_size: int = 10
    replay_batch_size: int = 10
    buffer_size: int = 500
    lr: float = 0.05
    width: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stream:
    """The samples of a case in stream order: inputs as stored, class indices and class names."""

    x: np.ndarray
    y: np.ndarray
    names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.y)


def make_stream(case: Case, data_dir: Path | None, seed: int = 0) -> Stream:
    """The case's stream; images come from CIFAR-100 under ``data_dir`` when given."""
    rng = np.random.default_rng(seed)
    if case.kind == "images":
        if data_dir is not None:
            data = load_cifar100(data_dir, "train")
            n = min(case.n_records, len(data))
            return Stream(data.x[:n], data.y[:n], data.fine_names, f"CIFAR-100 train[:{n}] (fine labels)")
        x = rng.integers(0, 256, size=(case.n_records, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, case.n_classes, size=case.n_records)
        names = tuple(f"c{k}" for k in range(case.n_classes))
        return Stream(x, y, names, f"random 32x32x3 uint8 pixels, {case.n_classes} classes")
    if case.kind == "features":
        means = rng.normal(0.0, 2.0, size=(case.n_classes, case.dim)).astype(np.float32)
        y = rng.integers(0, case.n_classes, size=case.n_records)
        x = (means[y] + rng.standard_normal((case.n_records, case.dim), dtype=np.float32)).astype(np.float32)
        names = tuple(f"c{k}" for k in range(case.n_classes))
        return Stream(x, y, names, f"{case.dim}-d float32 Gaussian clusters, {case.n_classes} classes")
    raise ValueError(f"unknown stream kind {case.kind!r}")


def messages(stream: Stream, topic: str = "bench") -> Iterator[Message]:
    """The stream as binary wire-format messages at offsets 0, 1, ... of partition 0."""
    for i in range(len(stream)):
        value, headers = encode_binary(f"s{i}", stream.x[i], stream.names[int(stream.y[i])])
        yield Message(Position(topic, 0, i), float(i), None, value, tuple(headers))


def batched_messages(stream: Stream, topic: str, per_message: int) -> Iterator[Message]:
    """The same stream as binary wire-format-2 messages of ``per_message`` samples (the last may hold fewer)."""
    for offset, first in enumerate(range(0, len(stream), per_message)):
        rows = slice(first, first + per_message)
        ids = [f"s{i}" for i in range(first, min(first + per_message, len(stream)))]
        labels = [stream.names[int(k)] for k in stream.y[rows]]
        value, headers = encode_batch_binary(ids, stream.x[rows], labels)
        yield Message(Position(topic, 0, offset), float(first), None, value, tuple(headers))


def write_recorded(stream: Stream, path: Path, per_message: int = 1) -> Path:
    """Write the stream to a recorded-stream file (the input of path b), ``per_message`` samples per message."""
    write_messages(path, messages(stream) if per_message == 1 else batched_messages(stream, "bench", per_message))
    return path
