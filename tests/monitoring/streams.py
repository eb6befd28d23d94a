"""Small generated recorded streams for the monitoring tests: Gaussian blobs as float32 vectors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from consumers.record import Message, Position
from consumers.recorded import write_messages
from consumers.wire import encode_binary

DIM = 16


def blobs(labels: np.ndarray, *, seed: int, spread: float = 1.0) -> np.ndarray:
    """One float32 sample per label around fixed class centres (the centres depend on nothing but ``DIM``)."""
    centres = np.random.default_rng(1234).normal(0, 3, size=(int(labels.max()) + 1, DIM))
    noise = np.random.default_rng(seed).normal(0, spread, size=(len(labels), DIM))
    return (centres[labels] + noise).astype(np.float32)


def write(path: Path, x: np.ndarray, labels: np.ndarray, *, topic: str = "t", garbage: Sequence[int] = ()) -> Path:
    """A recorded stream; record ``i`` has stream offset ``i`` and label ``c<labels[i]>``.

    The messages at the ``garbage`` offsets are not JSON (they become ``bad_json`` dead letters).
    """
    messages = []
    for i, (xi, yi) in enumerate(zip(x, labels, strict=True)):
        value, headers = encode_binary(f"{topic}-{i}", xi, f"c{int(yi)}")
        if i in garbage:
            value, headers = b"{not json", []
        messages.append(Message(Position(topic, 0, i), float(i), None, value, tuple(headers)))
    write_messages(path, messages)
    return path


def permuted_labels_stream(
    path: Path, *, n_before: int, n_after: int, classes: int = 4, seed: int = 0, garbage: Sequence[int] = ()
) -> Path:
    """I.i.d. classes; from record ``n_before`` on, every label is shifted by one (same inputs, new concept)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, size=n_before + n_after)
    shown = true.copy()
    shown[n_before:] = (true[n_before:] + 1) % classes
    return write(path, blobs(true, seed=seed), shown, garbage=garbage)


def class_incremental_stream(
    path: Path, *, tasks: int, per_task: int, classes_per_task: int = 2, seed: int = 0, garbage: Sequence[int] = ()
) -> Path:
    """Task ``t`` shows only classes ``t*k .. t*k+k-1``, shuffled within the task; old classes never return."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate(
        [rng.integers(t * classes_per_task, (t + 1) * classes_per_task, size=per_task) for t in range(tasks)]
    )
    return write(path, blobs(labels, seed=seed, spread=2.0), labels, garbage=garbage)
