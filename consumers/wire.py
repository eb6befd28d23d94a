"""The wire format (version 1): how one sample travels as a Kafka message value.

Two encodings, told apart by the ``content-type`` header (absent means JSON):

* ``application/json``: ``{"id": str, "x": [...], "shape": [...], "dtype": "uint8"|"float32",
  "y": "label" | ["coarse", "fine"] | null}``.
* ``application/x-streamcl-tensor``: the value is the raw little-endian tensor bytes; headers
  ``id``, ``dtype``, ``shape`` (JSON list) and ``y`` (JSON label path or ``null``) carry the rest.

Decoding never raises on bad input: :func:`decode` returns a :class:`DeadLetter` whose reason is
one of :data:`REASONS`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence

import numpy as np

from consumers.record import DeadLetter, Message, Record, label_path

WIRE_VERSION = 1
JSON_TYPE = b"application/json"
BINARY_TYPE = b"application/x-streamcl-tensor"
DTYPES = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4")}
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
_PARSED_MAX = 4096

REASONS = (
    "undecodable",  # bytes that are not valid UTF-8 JSON / unknown content type
    "bad_json",  # JSON that parses but is not the expected object
    "missing_field",
    "bad_dtype",
    "bad_shape",
    "non_finite",
    "oversized",
    "bad_label",
)
"""Every dead-letter reason the decoder can give (metrics touch each at start-up)."""


class BadRecord(ValueError):
    """A message that cannot become a record; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode_binary(
    sample_id: str, x: np.ndarray, label: str | Sequence[str] | None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Encode one sample as (value, headers) in the binary format."""
    dtype = _dtype_name(x)
    headers = [
        ("content-type", BINARY_TYPE),
        ("wire-version", str(WIRE_VERSION).encode()),
        ("id", sample_id.encode()),
        ("dtype", dtype.encode()),
        ("shape", json.dumps(list(x.shape)).encode()),
        ("y", json.dumps(_label_json(label)).encode()),
    ]
    return np.ascontiguousarray(x, dtype=DTYPES[dtype]).tobytes(), headers


def encode_json(
    sample_id: str, x: np.ndarray, label: str | Sequence[str] | None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Encode one sample as (value, headers) in the JSON format."""
    dtype = _dtype_name(x)
    body = {
        "id": sample_id,
        "x": x.reshape(-1).tolist(),
        "shape": list(x.shape),
        "dtype": dtype,
        "y": _label_json(label),
    }
    return json.dumps(body, separators=(",", ":")).encode(), [("content-type", JSON_TYPE)]


def decode(message: Message, max_bytes: int = MAX_PAYLOAD_BYTES) -> Record | DeadLetter:
    """Decode a message into a record, or a dead letter saying why it cannot be one."""
    try:
        return _decode(message, max_bytes)
    except BadRecord as bad:
        return DeadLetter(message, bad.reason, bad.detail)


def _decode(message: Message, max_bytes: int) -> Record:
    if len(message.value) > max_bytes:
        raise BadRecord("oversized", f"{len(message.value)} bytes > {max_bytes}")
    headers = dict(message.headers)
    content_type = headers.get("content-type", JSON_TYPE)
    if content_type == BINARY_TYPE:
        sample_id = _text(headers.get("id"), "id")
        dtype, shape, nbytes = _layout(headers.get("dtype"), headers.get("shape"))
        label = _binary_label(headers.get("y"))
        if len(message.value) != nbytes:
            raise BadRecord("bad_shape", f"{len(message.value)} bytes for shape {list(shape)} of {dtype.name}")
        x = _finite(np.frombuffer(message.value, dtype=dtype).reshape(shape))
    elif content_type == JSON_TYPE:
        body = _json_body(message.value)
        sample_id = body.get("id")
        if not isinstance(sample_id, str) or not sample_id:
            raise BadRecord("missing_field", "id must be a non-empty string")
        dtype = _parse_dtype(body.get("dtype"))
        shape = _parse_shape(body.get("shape"))
        label = _parse_label(body.get("y"))
        x = _json_array(body.get("x"), dtype, shape)
    else:
        raise BadRecord("undecodable", f"unknown content-type {content_type[:64]!r}")
    return Record(sample_id, x, label, message.position, message.timestamp, message)


# A stream repeats a handful of layouts and labels: both are remembered by their raw header bytes, so
# most records skip the JSON parsing (an exception is never cached: a bad header fails every time).
@functools.lru_cache(maxsize=_PARSED_MAX)
def _layout(dtype: bytes | None, shape: bytes | None) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, payload bytes) of a binary message."""
    array_dtype = _parse_dtype(_text(dtype, "dtype"))
    dims = _parse_shape(_json_header(shape, "shape"))
    return array_dtype, dims, math.prod(dims) * array_dtype.itemsize


@functools.lru_cache(maxsize=_PARSED_MAX)
def _binary_label(y: bytes | None) -> tuple[str, ...] | None:
    return _parse_label(_json_header(y, "y"))


def _dtype_name(x: np.ndarray) -> str:
    if x.dtype == np.uint8:
        return "uint8"
    if np.issubdtype(x.dtype, np.floating):
        return "float32"
    raise ValueError(f"unsupported dtype {x.dtype}; use uint8 or float32")


def _label_json(label: str | Sequence[str] | None) -> list[str] | None:
    path = label_path(label)
    return None if path is None else list(path)


def _text(raw: bytes | None, name: str) -> str:
    if raw is None:
        raise BadRecord("missing_field", f"header {name!r} missing")
    try:
        value = raw.decode()
    except UnicodeDecodeError as err:
        raise BadRecord("undecodable", f"header {name!r} is not UTF-8") from err
    if not value:
        raise BadRecord("missing_field", f"header {name!r} is empty")
    return value


def _json_header(raw: bytes | None, name: str) -> object:
    try:
        return json.loads(_text(raw, name))
    except json.JSONDecodeError as err:
        raise BadRecord("bad_json", f"header {name!r}: {err.msg}") from err


def _json_body(value: bytes) -> dict:
    try:
        body = json.loads(value)
    except UnicodeDecodeError as err:
        raise BadRecord("undecodable", "value is not UTF-8") from err
    except json.JSONDecodeError as err:
        raise BadRecord("bad_json", err.msg) from err
    if not isinstance(body, dict):
        raise BadRecord("bad_json", f"expected an object, got {type(body).__name__}")
    return body


def _parse_dtype(name: object) -> np.dtype:
    if name not in DTYPES:
        raise BadRecord("bad_dtype", f"dtype {name!r} not in {sorted(DTYPES)}")
    return DTYPES[name]  # type: ignore[index]


def _parse_shape(shape: object) -> tuple[int, ...]:
    ok = isinstance(shape, list) and 1 <= len(shape) <= 4
    ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    if not ok:
        raise BadRecord("bad_shape", f"shape must be 1-4 positive ints, got {str(shape)[:64]}")
    return tuple(shape)  # type: ignore[arg-type]


def _parse_label(label: object) -> tuple[str, ...] | None:
    try:
        return label_path(label)  # type: ignore[arg-type]
    except (ValueError, TypeError) as err:
        raise BadRecord("bad_label", str(err)[:200]) from err


def _json_array(x: object, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(x, list):
        raise BadRecord("missing_field", "x must be a list of numbers")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise BadRecord("bad_shape", "x must be a flat or nested list of numbers") from err
    if arr.size != math.prod(shape):
        raise BadRecord("bad_shape", f"{arr.size} values for shape {list(shape)}")
    arr = _finite(arr)
    if dtype == DTYPES["uint8"] and (arr.min() < 0 or arr.max() > 255 or np.any(arr != np.round(arr))):
        raise BadRecord("bad_dtype", "uint8 values must be integers in 0..255")
    return arr.reshape(shape).astype(dtype)


def _finite(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadRecord("non_finite", "x contains NaN or inf")
    return arr
