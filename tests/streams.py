"""Small generated streams for tests: class-incremental images or feature vectors, as messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from consumers.record import Message, Position
from consumers.recorded import write_messages
from consumers.wire import encode_binary


def blob_arrays(
    n_classes: int = 4, per_class: int = 50, *, shape: tuple[int, ...] = (8,), seed: int = 0, images: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Separable class blobs, class-incremental order (class 0's samples first, then class 1 ...)."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    centres = rng.normal(0, 3, size=(n_classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, size=(per_class, dim)) for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), per_class)
    if images:
        x = np.clip(128 + 20 * x, 0, 255).astype(np.uint8)
    return x.reshape(len(x), *shape).astype(np.uint8 if images else np.float32), y


def messages(x: np.ndarray, y: np.ndarray, *, topic: str = "test", paths: dict | None = None) -> list[Message]:
    """Binary-format messages, one per sample; ``paths`` maps class → label path (default ``c<k>``)."""
    out = []
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        label = paths[int(yi)] if paths else f"c{int(yi)}"
        value, headers = encode_binary(f"{topic}-{i}", xi, label)
        out.append(Message(Position(topic, 0, i), float(i), None, value, tuple(headers)))
    return out


def write_stream(path: Path, **kwargs) -> Path:
    """A recorded-stream file of class-incremental blobs (kwargs go to :func:`blob_arrays`)."""
    x, y = blob_arrays(**kwargs)
    write_messages(path, messages(x, y))
    return path


class FaultAhead:
    """A source that runs :meth:`before_poll` ahead of each poll of ``source``: faults injected mid-stream, with
    ``polled`` counting the records polled so far."""

    poll_timeout_s, fetches_ahead = 0.0, False

    def __init__(self, source) -> None:
        self.source, self.polled = source, 0

    @property
    def exhausted(self) -> bool:
        return self.source.exhausted

    def before_poll(self) -> None:
        """What to break (or mend) now."""

    def poll(self, timeout_s: float = 0.0, max_records: int = 10):
        self.before_poll()
        poll = self.source.poll(timeout_s, max_records)
        self.polled += len(poll)
        return poll

    def commit(self, offsets) -> None:
        self.source.commit(offsets)

    def close(self) -> None:
        self.source.close()
