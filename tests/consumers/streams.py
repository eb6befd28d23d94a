"""Small generated streams for the consumer tests (no dataset files needed)."""

from __future__ import annotations

import json

import numpy as np

from consumers.datasets import LabelledArrays
from consumers.record import Message, Position
from consumers.wire import BINARY_TYPE, encode_binary, encode_json

SHAPE = (4, 4, 1)
MAX_BYTES = 2048
"""Decoder payload limit used by the tests, so an ``oversized`` record stays small."""


def tiny_dataset(n: int = 120, classes: int = 4, seed: int = 0) -> LabelledArrays:
    """Random uint8 images whose class shifts the mean, with a two-level label (``group``, ``c<k>``)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = (rng.integers(0, 60, (n, *SHAPE)) + 40 * y[:, None, None, None]).astype(np.uint8)
    fine = tuple(f"c{k}" for k in range(classes))
    return LabelledArrays(x, y, fine, y % 2, ("even", "odd"))


def good_messages(n: int, stream: str = "src") -> list[Message]:
    """``n`` decodable messages, alternating JSON and binary, keyed by id."""
    data = tiny_dataset(n)
    out = []
    for i in range(n):
        encode = encode_json if i % 2 else encode_binary
        value, headers = encode(f"good-{i}", data.x[i], list(data.path(i)))
        out.append(Message(Position(stream, 0, i), float(i), f"good-{i}".encode(), value, tuple(headers)))
    return out


def bad_messages(stream: str = "src") -> dict[str, Message]:
    """One message per kind of bad input, keyed by the dead-letter reason it must get (all but ``internal``)."""

    def msg(key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> Message:
        return Message(Position(stream, 0, 0), 0.0, key.encode(), value, tuple(headers or []))

    def body(**fields: object) -> bytes:
        base: dict[str, object] = {"id": "b", "x": [1, 2, 3, 4], "shape": [4], "dtype": "uint8", "y": "a"}
        base.update(fields)
        return json.dumps(base).encode()

    nan_value, nan_headers = encode_binary("nan", np.array([1.0, np.nan, 0.0, np.inf], np.float32), "a")
    return {
        "undecodable": msg("bad-undecodable", b"\x80\x81\x82 not utf-8"),
        "bad_json": msg("bad-json", b'{"id": "b", "x": [1, 2'),
        "missing_field": msg("bad-missing", body(id=None)),
        "bad_shape": msg("bad-shape", body(shape=[2, 3])),
        "bad_dtype": msg("bad-dtype", body(dtype="int64")),
        "non_finite": msg("bad-nan", nan_value, nan_headers),
        "oversized": msg("bad-big", b"\x00" * (MAX_BYTES + 1), [("content-type", BINARY_TYPE)]),
        "bad_label": msg("bad-label", body(y=5)),
        "out_of_range": msg("bad-range", body(x=[1e300, 0, 0, 0], dtype="float32")),
        "bad_id": msg("bad-id", body(id="i" * 300)),
    }
