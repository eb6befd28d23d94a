"""Turn a labelled dataset into wire-format messages (``stream-cl produce``), in a chosen order.

Each sample becomes one message (wire format 1): key = sample id (``<name>-<index>``), value and headers from
:func:`consumers.wire.encode_json` or :func:`consumers.wire.encode_binary`, label = the dataset's label path
(``(coarse, fine)`` for CIFAR-100 and Fashion-MNIST). With ``samples_per_message`` N > 1, each N consecutive
samples of the stream become one message (wire format 2, :func:`consumers.wire.encode_batch_json` or
:func:`consumers.wire.encode_batch_binary`; the last one may hold fewer) keyed by its first sample's id.
A message's timestamp is ``index / rate`` seconds of its first sample, so a file replayed with ``--speed 1``
plays at ``rate`` samples per second.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from consumers.datasets import LabelledArrays
from consumers.record import Message, Position
from consumers.wire import MAX_SAMPLES, encode_batch_binary, encode_batch_json, encode_binary, encode_json

FORMATS = ("json", "binary")
ORDERS = ("class-incremental", "shuffled")
_ENCODERS = {"json": encode_json, "binary": encode_binary}
_BATCH_ENCODERS = {"json": encode_batch_json, "binary": encode_batch_binary}


def stream_order(
    labels: np.ndarray, *, order: str = "class-incremental", seed: int = 0, limit: int | None = None
) -> np.ndarray:
    """Sample indices in stream order.

    ``limit`` first draws that many samples uniformly at random (so every class keeps a share), then
    ``class-incremental`` groups them by label in label order, shuffled within each class, and ``shuffled``
    permutes them.

    >>> stream_order(np.array([1, 0, 1, 0]), seed=0).tolist()
    [3, 1, 2, 0]
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels))
    if limit is not None and limit < len(idx):
        idx = np.sort(rng.choice(len(idx), size=limit, replace=False))
    if order == "shuffled":
        return rng.permutation(idx)
    return idx[np.lexsort((rng.random(len(idx)), labels[idx]))]


def dataset_messages(
    data: LabelledArrays,
    name: str,
    *,
    fmt: str = "binary",
    order: str = "class-incremental",
    seed: int = 0,
    limit: int | None = None,
    rate: float = 1000.0,
    samples_per_message: int = 1,
) -> Iterator[Message]:
    """Messages for ``data`` in stream order; positions are ``(name, 0, index of the message)``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not 1 <= samples_per_message <= MAX_SAMPLES:
        raise ValueError(f"samples_per_message must be in 1-{MAX_SAMPLES}, got {samples_per_message}")
    order_ = stream_order(data.y, order=order, seed=seed, limit=limit)
    if samples_per_message == 1:
        encode = _ENCODERS[fmt]
        for offset, i in enumerate(order_):
            sample_id = f"{name}-{int(i)}"
            value, headers = encode(sample_id, data.x[i], list(data.path(int(i))))
            yield Message(Position(name, 0, offset), offset / rate, sample_id.encode(), value, tuple(headers))
        return
    encode_batch = _BATCH_ENCODERS[fmt]
    for offset, first in enumerate(range(0, len(order_), samples_per_message)):
        chunk = order_[first : first + samples_per_message]
        ids = [f"{name}-{int(i)}" for i in chunk]
        value, headers = encode_batch(ids, data.x[chunk], [list(data.path(int(i))) for i in chunk])
        yield Message(Position(name, 0, offset), first / rate, ids[0].encode(), value, tuple(headers))
