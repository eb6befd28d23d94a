"""The wire format: how samples travel as Kafka message values.

Version 1 carries one sample per message, version 2 many (a leading batch dimension in ``shape``, an
``ids`` list and a ``ys`` list of labels), so the per-message costs of the broker, the client and the
decoder are paid once per batch. Two encodings each, told apart by the ``content-type`` header (absent
means JSON):

* ``application/json``: version 1 ``{"id": str, "x": [...], "shape": [...], "dtype": "uint8"|"float32",
  "y": "label" | ["coarse", "fine"] | null}``; version 2 ``{"ids": [str, ...], "x": [...], "shape": [n, ...],
  "dtype": ..., "ys": [label or null, ...]}``.
* ``application/x-streamcl-tensor``: the value is the raw little-endian tensor bytes; headers ``id``,
  ``dtype``, ``shape`` (JSON list) and ``y`` (JSON label path or ``null``) carry the rest (version 2:
  ``ids`` and ``ys``, JSON lists, instead of ``id`` and ``y``).

Decoding never raises: :func:`decode_samples` returns a record or a :class:`DeadLetter` per sample, whose
reason is one of :data:`REASONS`; a message whose envelope is bad (its dtype, shape, or ids/ys lengths
that disagree) is one dead letter, a bad sample of a good envelope is a dead letter for that sample only.
The work per message is bounded before any parsing: the value's size, the JSON's nesting depth and the
length of each number literal are checked on the raw bytes first.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence

import numpy as np

from consumers.record import DeadLetter, Message, Position, Record, label_path, message_bytes

WIRE_VERSION = 1
BATCH_WIRE_VERSION = 2
MAX_SAMPLES = 4096
"""Most samples one message may carry (version 2)."""
MAX_BATCH_HEADER_BYTES = 1024 * 1024
"""Largest ``ids``/``ys`` header of a binary version-2 message."""
JSON_TYPE = b"application/json"
BINARY_TYPE = b"application/x-streamcl-tensor"
DTYPES = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4")}
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
"""Most bytes a message's key and headers may hold together (the value has its own ``max_bytes``): a sample
waiting for its label keeps them, so a producer's extra headers must not be able to exhaust memory."""
MAX_DIMS = 4
"""Most dimensions a shape may have."""
MAX_JSON_DEPTH = 1 + MAX_DIMS
"""Deepest bracket nesting a JSON value may have: the object, then ``x`` nested once per dimension."""
MAX_BATCH_JSON_DEPTH = MAX_JSON_DEPTH + 1
"""The same for version 2, whose ``x`` has the batch dimension too."""
MAX_NUMBER_CHARS = 40
"""Longest number literal (digits, sign, point, exponent) in JSON; float64's longest repr is 24."""
MAX_HEADER_BYTES = 16 * 1024
"""Largest ``dtype``/``shape``/``y`` header of a binary message (an id is refused past 4 bytes a character)."""
MAX_ID_CHARS = 256
MAX_LABEL_DEPTH = 8
"""Most levels a label path may have."""
MAX_LABEL_CHARS = 256
"""Longest label part, in characters."""
MAX_DETAIL_CHARS = 200
_PARSED_MAX = 4096
_FIELDS = frozenset(("id", "x", "shape", "dtype", "y"))
_BATCH_FIELDS = frozenset(("ids", "x", "shape", "dtype", "ys"))
# The shape and y headers are flat lists; one level more lets a nested one get its field's own reason.
_HEADER_DEPTH = 2
_YS_HEADER_DEPTH = 3  # a list of label paths
# Largest magnitude that float32 rounds to a finite value: float32's max plus half its last step
# (the midpoint itself rounds to even, i.e. to infinity).
_FLOAT32_LIMIT = 2.0**128 - 2.0**103

REASONS = (
    "undecodable",  # bytes that are not valid UTF-8 / unknown content type / a record the Kafka client cannot read
    "bad_json",  # not JSON, not the expected object, or nested deeper than MAX_JSON_DEPTH
    "missing_field",
    "bad_dtype",  # unknown dtype, or uint8 values that are not integers in 0..255
    "bad_shape",  # bad shape, a count of values that does not match it, or values in x that are not numbers
    "non_finite",  # NaN/inf in a binary float32 tensor, or a NaN/Infinity literal in JSON
    "out_of_range",  # a number that does not fit the dtype (float32 beyond its finite range), or too many digits
    "oversized",
    "bad_label",
    "bad_id",  # an id longer than MAX_ID_CHARS or not encodable as UTF-8
    "internal",  # an unexpected error while decoding; the detail names it
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
        # UTF-8 rather than \u escapes: the longest label path allowed stays well inside MAX_HEADER_BYTES
        ("y", json.dumps(_label_json(label), ensure_ascii=False).encode()),
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


def encode_batch_binary(
    ids: Sequence[str], x: np.ndarray, labels: Sequence[str | Sequence[str] | None]
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Encode ``len(ids)`` samples (``x`` stacked along its first axis) as one version-2 binary message."""
    dtype = _dtype_name(x)
    _check_batch(ids, x, labels)
    headers = [
        ("content-type", BINARY_TYPE),
        ("wire-version", str(BATCH_WIRE_VERSION).encode()),
        ("ids", json.dumps(list(ids), ensure_ascii=False).encode()),
        ("dtype", dtype.encode()),
        ("shape", json.dumps(list(x.shape)).encode()),
        ("ys", json.dumps([_batch_label_json(label) for label in labels], ensure_ascii=False).encode()),
    ]
    return np.ascontiguousarray(x, dtype=DTYPES[dtype]).tobytes(), headers


def encode_batch_json(
    ids: Sequence[str], x: np.ndarray, labels: Sequence[str | Sequence[str] | None]
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Encode ``len(ids)`` samples (``x`` stacked along its first axis) as one version-2 JSON message."""
    dtype = _dtype_name(x)
    _check_batch(ids, x, labels)
    body = {
        "ids": list(ids),
        "x": x.reshape(-1).tolist(),
        "shape": list(x.shape),
        "dtype": dtype,
        "ys": [_batch_label_json(label) for label in labels],
    }
    return json.dumps(body, separators=(",", ":")).encode(), [
        ("content-type", JSON_TYPE),
        ("wire-version", str(BATCH_WIRE_VERSION).encode()),
    ]


def _check_batch(ids: Sequence[str], x: np.ndarray, labels: Sequence) -> None:
    if not 1 <= len(ids) <= MAX_SAMPLES or x.ndim < 2 or not len(ids) == len(x) == len(labels):
        raise ValueError(
            f"a batch needs 1-{MAX_SAMPLES} ids, x stacked along its first axis and a label (or None) for each; "
            f"got {len(ids)} ids, x of shape {list(x.shape)}, {len(labels)} labels"
        )


def decode(message: Message, max_bytes: int = MAX_PAYLOAD_BYTES) -> Record | DeadLetter:
    """Decode a single-sample message into a record, or a dead letter saying why it cannot be one. Never raises.

    A version-2 message of several samples is a ``bad_shape`` dead letter here: :func:`decode_samples` reads those.
    """
    decoded = decode_samples(message, max_bytes)
    if len(decoded) == 1:
        return decoded[0]
    return DeadLetter(message, "bad_shape", f"a message of {len(decoded)} samples where one was expected")


def decode_samples(message: Message, max_bytes: int = MAX_PAYLOAD_BYTES) -> list[Record | DeadLetter]:
    """Decode a message into its samples, each a record or a dead letter saying why it cannot be one.

    A bad envelope is one dead letter holding the message; a bad sample of a version-2 message is a dead
    letter whose message is that sample's (its position names the sample, see :func:`sample_message`).
    Never raises.
    """
    try:
        return _decode(message, max_bytes)
    except BadRecord as bad:
        return [DeadLetter(message, bad.reason, bad.detail)]
    except Exception as err:  # a decoder bug must cost one message, never the consumer
        return [DeadLetter(message, "internal", f"{type(err).__name__}: {err}"[:MAX_DETAIL_CHARS])]


def _decode(message: Message, max_bytes: int) -> list[Record | DeadLetter]:
    if len(message.value) > max_bytes:
        raise BadRecord("oversized", f"{len(message.value)} bytes > {max_bytes}")
    envelope = message_bytes(message) - len(message.value)
    if envelope > MAX_ENVELOPE_BYTES:
        raise BadRecord("oversized", f"key and headers of {envelope} bytes > {MAX_ENVELOPE_BYTES}")
    headers = dict(message.headers)
    content_type = headers.get("content-type", JSON_TYPE)
    if content_type == BINARY_TYPE:
        if "ids" in headers:
            return _binary_batch(message, headers)
        sample_id = _binary_id(headers.get("id"))
        dtype, shape, nbytes = _layout(headers.get("dtype"), headers.get("shape"))
        label = _binary_label(headers.get("y"))
        if len(message.value) != nbytes:
            raise BadRecord("bad_shape", f"{len(message.value)} bytes for shape {list(shape)} of {dtype.name}")
        x = np.frombuffer(message.value, dtype=dtype).reshape(shape)
        if dtype.kind == "f" and not np.isfinite(x).all():
            raise BadRecord("non_finite", "x contains NaN or inf")
    elif content_type == JSON_TYPE:
        body, has_booleans = _json_body(message.value)
        if "ids" in body:
            return _json_batch(message, body, has_booleans)
        sample_id = _parse_id(body.get("id"))
        dtype = _parse_dtype(body.get("dtype"))
        shape = _parse_shape(body.get("shape"))
        label = _parse_label(body.get("y"))
        # quotes delimit the keys, the id, the dtype and the label parts; any other string may sit in x
        strings = len(body) + 2 + (len(label) if label else 0)
        unexplained = body.keys() - _FIELDS or message.value.count(b'"') != 2 * strings
        x = _json_array(body.get("x"), dtype, shape, has_booleans or bool(unexplained))
    else:
        raise BadRecord("undecodable", f"unknown content-type {content_type[:64]!r}")
    return [Record(sample_id, x, label, message.position, message.timestamp, message)]


def _binary_batch(message: Message, headers: dict[str, bytes]) -> list[Record | DeadLetter]:
    if "id" in headers or "y" in headers:
        raise BadRecord("bad_json", "a message has headers id and y (version 1) or ids and ys (version 2), not both")
    ids = _batch_list(_json_header(headers.get("ids"), "ids", _HEADER_DEPTH, MAX_BATCH_HEADER_BYTES), "ids")
    dtype, shape, nbytes = _batch_layout(headers.get("dtype"), headers.get("shape"))
    ys = _batch_list(_json_header(headers.get("ys"), "ys", _YS_HEADER_DEPTH, MAX_BATCH_HEADER_BYTES), "ys")
    _agree(len(ids), len(ys), shape)
    if len(message.value) != nbytes:
        raise BadRecord("bad_shape", f"{len(message.value)} bytes for shape {list(shape)} of {dtype.name}")
    x = np.frombuffer(message.value, dtype=dtype).reshape(shape)
    bad: dict[int, BadRecord] = {}
    if dtype.kind == "f":
        for i in np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)).tolist():
            bad[i] = BadRecord("non_finite", "x contains NaN or inf")
    return _samples(message, ids, ys, x, bad)


def _json_batch(message: Message, body: dict, has_booleans: bool) -> list[Record | DeadLetter]:
    if "id" in body or "y" in body:
        raise BadRecord("bad_json", "a message has id and y (version 1) or ids and ys (version 2), not both")
    ids = _batch_list(body["ids"], "ids")
    dtype = _parse_dtype(body.get("dtype"))
    shape = _parse_batch_shape(body.get("shape"))
    ys = _batch_list(body["ys"], "ys") if "ys" in body else [None] * len(ids)
    _agree(len(ids), len(ys), shape)
    _fits_json(shape, len(message.value))
    # quotes delimit the keys, the dtype, the ids and the label parts; any other string may sit in x
    strings = len(body) + 1 + sum(type(i) is str for i in ids) + sum(map(_label_strings, ys))
    unexplained = body.keys() - _BATCH_FIELDS or message.value.count(b'"') != 2 * strings
    x, bad = _json_rows(body.get("x"), dtype, shape, has_booleans or bool(unexplained))
    return _samples(message, ids, ys, x, bad)


def _fits_json(shape: tuple[int, ...], value_bytes: int) -> None:
    """Refuse a shape of more values than ``value_bytes`` of JSON can spell (a digit and a comma each).

    Checked before anything is allocated for the shape: a message of a hundred bytes must not declare
    gigabytes of rows (a sample nested as a list of its own is laid out in rows of the declared size).
    """
    count = math.prod(shape)
    if 2 * count - 1 > value_bytes:
        raise BadRecord("bad_shape", f"shape {list(shape)} of {count} values cannot fit in {value_bytes} bytes")


def _label_strings(label: object) -> int:
    """Strings a well-formed label holds (a malformed one counts too few, so its message is looked at closely)."""
    if type(label) is str:
        return 1
    return sum(type(part) is str for part in label) if type(label) is list else 0


def _batch_list(value: object, name: str) -> list:
    if not isinstance(value, list) or not value:
        raise BadRecord("missing_field", f"{name} must be a non-empty list")
    if len(value) > MAX_SAMPLES:
        raise BadRecord("oversized", f"{len(value)} samples > {MAX_SAMPLES}")
    return value


def _agree(n_ids: int, n_ys: int, shape: tuple[int, ...]) -> None:
    if not n_ids == n_ys == shape[0]:
        raise BadRecord("bad_shape", f"{n_ids} ids, {n_ys} labels and shape {list(shape)} disagree on the sample count")


def _samples(
    message: Message, ids: list, ys: list, x: np.ndarray, bad: dict[int, BadRecord]
) -> list[Record | DeadLetter]:
    """One record or dead letter per sample of a version-2 message whose envelope is good."""
    stream, partition, offset = message.position.stream, message.position.partition, message.position.offset
    n, timestamp, key, value, headers = len(ids), message.timestamp, message.key, message.value, message.headers
    if bad or not _good_ids(ids):
        return _checked_samples(message, ids, ys, x, bad)
    out: list[Record | DeadLetter] = []
    for i, (sample_id, label) in enumerate(zip(ids, ys, strict=True)):
        position = Position(stream, partition, offset, i, n)
        sample = Message(position, timestamp, key, value, headers)
        try:
            path = _sample_label(label)
        except BadRecord as problem:
            out.append(DeadLetter(sample, problem.reason, problem.detail))
            continue
        out.append(Record(sample_id, x[i], path, position, timestamp, sample))
    return out


def _good_ids(ids: list) -> bool:
    """Whether every id is a distinct, well-formed string: checked at C speed, so a good batch skips the
    per-sample id checks."""
    if not all(type(i) is str and 0 < len(i) <= MAX_ID_CHARS for i in ids) or len(set(ids)) != len(ids):
        return False
    return _utf8("".join(ids))


def _checked_samples(
    message: Message, ids: list, ys: list, x: np.ndarray, bad: dict[int, BadRecord]
) -> list[Record | DeadLetter]:
    """:func:`_samples` for a batch with a bad sample or id somewhere: each id checked, repeats refused."""
    stream, partition, offset = message.position.stream, message.position.partition, message.position.offset
    n, timestamp, seen = len(ids), message.timestamp, {}
    out: list[Record | DeadLetter] = []
    for i in range(n):
        position = Position(stream, partition, offset, i, n)
        sample = Message(position, timestamp, message.key, message.value, message.headers)
        try:
            sample_id = _parse_id(ids[i])
            if sample_id in seen:
                raise BadRecord("bad_id", f"id {sample_id[:64]!r} repeats sample {seen[sample_id]} of this message")
            seen[sample_id] = i
            if i in bad:
                raise bad[i]
            label = _sample_label(ys[i])
        except BadRecord as problem:
            out.append(DeadLetter(sample, problem.reason, problem.detail))
            continue
        out.append(Record(sample_id, x[i], label, position, timestamp, sample))
    return out


def _sample_label(label: object) -> tuple[str, ...] | None:
    if label is None:
        return None
    if type(label) is str:
        return _parsed_label(label)
    if type(label) is list and all(type(part) is str for part in label):
        return _parsed_label(tuple(label))
    return _parse_label(label)


@functools.lru_cache(maxsize=_PARSED_MAX)
def _parsed_label(label: str | tuple[str, ...]) -> tuple[str, ...] | None:
    return _parse_label(label if isinstance(label, str) else list(label))


def sample_message(message: Message) -> Message:
    """The message a dead letter of one sample is stored as: that sample alone, as a version-2 message of one.

    ``message`` is a sample's message from :func:`decode_samples` (the whole batch, positioned at the
    sample); what comes back holds only the sample's ``x`` (binary: its bytes; JSON: its values parsed and
    written again, so a literal past float64's precision or range changes), id and label as they were
    sent (bad ones too), with ``shape`` ``[1, ...]``, the other headers unchanged, and the same
    position, so decoding it again finds the sample's own fault (a repeated id is a fault of the batch
    alone). A message of one sample (this function's own output too) comes back unchanged. Never raises
    (on a failure the whole message comes back).
    """
    position = message.position
    if position.count == 1:
        return message
    try:
        headers = dict(message.headers)
        if headers.get("content-type", JSON_TYPE) == BINARY_TYPE:
            ids = _parsed_part(headers["ids"])
            value, replaced = _binary_sample(message.value, headers, position.index, position.count)
        else:
            ids = _parsed_body(message.value)["ids"]
            value, replaced = _json_sample(message.value, position.index, position.count)
    except Exception:  # the dead letter must still be written: the whole message says everything
        return message
    if len(ids) == 1:  # the sample alone already
        return message
    kept = [(k, v) for k, v in message.headers if k not in replaced]
    return Message(position, message.timestamp, message.key, value, (*kept, *replaced.items()))


# The samples of one message are cut out one after another (each dead sample, each pending one): its parts
# are parsed once, not once per sample (4,096 samples of a few MiB would cost minutes). Never mutated.
@functools.lru_cache(maxsize=1)
def _parsed_body(value: bytes) -> dict:
    return json.loads(value)


@functools.lru_cache(maxsize=3)  # ids, ys and shape of a binary message
def _parsed_part(header: bytes) -> list:
    return json.loads(header)


def _binary_sample(value: bytes, headers: dict[str, bytes], index: int, count: int) -> tuple[bytes, dict]:
    shape = _parsed_part(headers["shape"])
    size = len(value) // count
    replaced = {
        "wire-version": str(BATCH_WIRE_VERSION).encode(),
        "ids": json.dumps(_parsed_part(headers["ids"])[index : index + 1]).encode(),
        "shape": json.dumps([1, *shape[1:]]).encode(),
        "ys": json.dumps(_parsed_part(headers["ys"])[index : index + 1]).encode(),
    }
    return value[index * size : (index + 1) * size], replaced


def _json_sample(value: bytes, index: int, count: int) -> tuple[bytes, dict]:
    body = _parsed_body(value)
    x, shape = body["x"], body["shape"]
    if x and isinstance(x[0], list):  # nested along the batch dimension
        sample_x = x[index : index + 1]
    else:
        size = len(x) // count
        sample_x = x[index * size : (index + 1) * size]
    sample = {"ids": body["ids"][index : index + 1], "x": sample_x, "shape": [1, *shape[1:]], "dtype": body["dtype"]}
    if "ys" in body:
        sample["ys"] = body["ys"][index : index + 1]
    replaced = {"wire-version": str(BATCH_WIRE_VERSION).encode()}
    return json.dumps(sample, separators=(",", ":")).encode(), replaced


# A stream repeats a handful of layouts and labels: both are remembered by their raw header bytes, so
# most records skip the JSON parsing (an exception is never cached: a bad header fails every time).
@functools.lru_cache(maxsize=_PARSED_MAX)
def _layout(dtype: bytes | None, shape: bytes | None) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, payload bytes) of a binary message."""
    array_dtype = _parse_dtype(_text(dtype, "dtype"))
    dims = _parse_shape(_json_header(shape, "shape"))
    return array_dtype, dims, math.prod(dims) * array_dtype.itemsize


@functools.lru_cache(maxsize=_PARSED_MAX)
def _batch_layout(dtype: bytes | None, shape: bytes | None) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape with the batch dimension, payload bytes) of a binary version-2 message."""
    array_dtype = _parse_dtype(_text(dtype, "dtype"))
    dims = _parse_batch_shape(_json_header(shape, "shape"))
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


def _batch_label_json(label: str | Sequence[str] | None) -> str | list[str] | None:
    # a one-level label as a plain string: a list of them has no nesting, so its depth check is one count
    path = _label_json(label)
    return path[0] if path is not None and len(path) == 1 else path


def _text(raw: bytes | None, name: str, limit: int = MAX_HEADER_BYTES) -> str:
    if raw is None:
        raise BadRecord("missing_field", f"header {name!r} missing")
    if len(raw) > limit:
        raise BadRecord("oversized", f"header {name!r} has {len(raw)} bytes > {limit}")
    try:
        value = raw.decode()
    except UnicodeDecodeError as err:
        raise BadRecord("undecodable", f"header {name!r} is not UTF-8") from err
    if not value:
        raise BadRecord("missing_field", f"header {name!r} is empty")
    return value


def _binary_id(raw: bytes | None) -> str:
    if raw is not None and len(raw) > 4 * MAX_ID_CHARS:  # before decoding: no UTF-8 char is over 4 bytes
        raise BadRecord("bad_id", f"id of {len(raw)} bytes is longer than {MAX_ID_CHARS} characters")
    return _parse_id(_text(raw, "id"))


def _json_header(raw: bytes | None, name: str, depth: int = _HEADER_DEPTH, limit: int = MAX_HEADER_BYTES) -> object:
    text = _text(raw, name, limit)
    _check_json_text(raw, depth)  # type: ignore[arg-type]
    try:
        value = _loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord("bad_json", f"header {name!r}: {err.msg}") from err
    return value


def _json_body(value: bytes) -> tuple[dict, bool]:
    """The parsed JSON object, and whether any ``true``/``false`` literal occurs in it."""
    if not value:  # JSON's own message ("Expecting value") would read like a producer's bug
        raise BadRecord("bad_json", "empty value (a tombstone, or a message without a value)")
    try:
        text = value.decode()
    except UnicodeDecodeError as err:
        raise BadRecord("undecodable", "value is not UTF-8") from err
    too_deep = None
    try:
        has_booleans = _check_json_text(value, MAX_JSON_DEPTH)
    except BadRecord as bad:  # a version-2 x has one level more: only those may be that deep
        if bad.reason != "bad_json":
            raise
        has_booleans, too_deep = _check_json_text(value, MAX_BATCH_JSON_DEPTH), bad
    try:
        body = _loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord("bad_json", err.msg) from err
    if not isinstance(body, dict):
        raise BadRecord("bad_json", f"expected an object, got {type(body).__name__}")
    if too_deep is not None and "ids" not in body:
        raise too_deep
    return body, has_booleans


def _reject_constant(name: str) -> None:
    raise BadRecord("non_finite", f"JSON literal {name} is not a finite number")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(text: str) -> object:
    """Strict JSON: a UTF-8 BOM, trailing data and NaN/Infinity literals are errors."""
    return _decoder.decode(text)


# The bytes of a JSON text with every number character mapped to "0" and braces to brackets: one C-speed
# translation makes nesting, number lengths and boolean literals countable with bytes methods.
_NUMBER_CHARS = b"0123456789+-.eE"
_MAPPING = bytes.maketrans(_NUMBER_CHARS + b"{}", b"0" * len(_NUMBER_CHARS) + b"[]")
_LONG_NUMBER = b"0" * (MAX_NUMBER_CHARS + 1)


def _check_json_text(raw: bytes, max_depth: int) -> bool:
    """Refuse JSON nested deeper than ``max_depth`` or with a number literal over MAX_NUMBER_CHARS.

    Checked on the bytes, before parsing, so that neither the parser's recursion nor Python's int
    conversion can be made to do unbounded work. Returns whether a ``true``/``false`` literal may occur.
    """
    mapped = raw.translate(_MAPPING)
    structure = mapped.translate(None, b"0")  # numbers gone: much shorter; "true" -> "tru", "false" -> "fals"
    # both tests are upper bounds (strings count too): only a value that fails them is scanned exactly
    if structure.count(b"[") > max_depth or _LONG_NUMBER in mapped:
        _check_outside_strings(raw, mapped, max_depth)
    return b"tru" in structure or b"fals" in structure


def _check_outside_strings(raw: bytes, mapped: bytes, max_depth: int) -> None:
    quotes = _delimiting_quotes(raw)

    def outside(positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(quotes, positions) % 2 == 0  # an even number of quotes before: not in a string

    data = np.frombuffer(mapped, np.uint8)
    opens, closes = np.flatnonzero(data == ord("[")), np.flatnonzero(data == ord("]"))
    opens, closes = opens[outside(opens)], closes[outside(closes)]
    if len(opens) > max_depth:
        brackets = np.concatenate((opens, closes))
        steps = np.concatenate((np.ones(len(opens), np.int32), np.full(len(closes), -1, np.int32)))
        if np.cumsum(steps[np.argsort(brackets)]).max() > max_depth:
            raise BadRecord("bad_json", f"nested deeper than {max_depth}")
    number = np.concatenate(([False], data == ord("0"), [False]))
    edges = np.flatnonzero(number[1:] != number[:-1])
    starts = edges[::2][edges[1::2] - edges[::2] > MAX_NUMBER_CHARS]
    if outside(starts).any():
        raise BadRecord("out_of_range", f"a number literal is longer than {MAX_NUMBER_CHARS} characters")


def _delimiting_quotes(raw: bytes) -> np.ndarray:
    """Positions of the quotes that open or close strings (not those escaped by a backslash)."""
    data = np.frombuffer(raw, np.uint8)
    quotes = np.flatnonzero(data == ord('"'))
    if b"\\" not in raw or not len(quotes):
        return quotes
    index = np.arange(len(data))
    last_other = np.maximum.accumulate(np.where(data == ord("\\"), -1, index))
    before = np.maximum(quotes - 1, 0)
    backslashes = np.where(quotes > 0, before - last_other[before], 0)
    return quotes[backslashes % 2 == 0]


def _parse_id(sample_id: object) -> str:
    if not isinstance(sample_id, str) or not sample_id:
        raise BadRecord("missing_field", "id must be a non-empty string")
    if len(sample_id) > MAX_ID_CHARS:
        raise BadRecord("bad_id", f"id of {len(sample_id)} characters > {MAX_ID_CHARS}")
    if not _utf8(sample_id):
        raise BadRecord("bad_id", "id is not encodable as UTF-8 (lone surrogate)")
    return sample_id


def _utf8(text: str) -> bool:
    # JSON escapes can spell lone surrogates, which no header, metric label or Redis key can carry
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _parse_dtype(name: object) -> np.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise BadRecord("bad_dtype", f"dtype {str(name)[:64]!r} not in {sorted(DTYPES)}")
    return DTYPES[name]


def _parse_shape(shape: object) -> tuple[int, ...]:
    ok = isinstance(shape, list) and 1 <= len(shape) <= MAX_DIMS
    ok = ok and all(type(d) is int and d > 0 for d in shape)  # type: ignore[union-attr]
    if not ok:
        raise BadRecord("bad_shape", f"shape must be 1-{MAX_DIMS} positive ints, got {str(shape)[:64]}")
    return tuple(shape)  # type: ignore[arg-type]


def _parse_batch_shape(shape: object) -> tuple[int, ...]:
    ok = isinstance(shape, list) and 2 <= len(shape) <= MAX_DIMS + 1
    ok = ok and all(type(d) is int and d > 0 for d in shape)  # type: ignore[union-attr]
    if not ok:
        detail = f"shape must be the sample count then 1-{MAX_DIMS} positive ints, got {str(shape)[:64]}"
        raise BadRecord("bad_shape", detail)
    return tuple(shape)  # type: ignore[arg-type]


def _parse_label(label: object) -> tuple[str, ...] | None:
    try:
        path = label_path(label)  # type: ignore[arg-type]
    except (ValueError, TypeError) as err:
        raise BadRecord("bad_label", str(err)[:MAX_DETAIL_CHARS]) from err
    if path is None:
        return None
    if len(path) > MAX_LABEL_DEPTH:
        raise BadRecord("bad_label", f"label path of {len(path)} levels > {MAX_LABEL_DEPTH}")
    if max(map(len, path)) > MAX_LABEL_CHARS:
        raise BadRecord("bad_label", f"a label part is longer than {MAX_LABEL_CHARS} characters")
    if not all(map(_utf8, path)):
        raise BadRecord("bad_label", "label is not encodable as UTF-8 (lone surrogate)")
    return path


def _json_array(x: object, dtype: np.dtype, shape: tuple[int, ...], look_closely: bool) -> np.ndarray:
    """``x`` as an array of ``dtype``; ``look_closely``: it may hold booleans or numeric strings.

    numpy turns those (and null, as NaN) into numbers silently, so they are searched for element by element,
    but only in values whose text hints at them: a good record costs one conversion and a range check.
    """
    if not isinstance(x, list):
        raise BadRecord("missing_field", "x must be a list of numbers")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise BadRecord("bad_shape", "x must be a flat or nested list of numbers of equal lengths") from err
    if look_closely and not _numbers_only(x):
        raise BadRecord("bad_shape", _NOT_NUMBERS)
    if arr.ndim != 1 and arr.shape != shape:
        raise BadRecord("bad_shape", f"x nested as {list(arr.shape)} for shape {list(shape)}")
    if arr.size != math.prod(shape):
        raise BadRecord("bad_shape", f"{arr.size} values for shape {list(shape)}")
    if dtype == DTYPES["uint8"]:
        if not (((arr >= 0) & (arr <= 255)).all() and np.array_equal(arr, np.round(arr))):
            _refuse_values("bad_dtype", "uint8 values must be integers in 0..255", arr)
    elif not (np.abs(arr) < _FLOAT32_LIMIT).all():  # before the cast, which would make them inf
        _refuse_values("out_of_range", "x has values beyond float32's finite range", arr)
    return arr.reshape(shape).astype(dtype)


def _json_rows(
    x: object, dtype: np.dtype, shape: tuple[int, ...], look_closely: bool
) -> tuple[np.ndarray, dict[int, BadRecord]]:
    """A version-2 ``x`` as an array of ``dtype`` and ``shape``, and the samples whose values are bad.

    The checks run on all samples at once; only a message whose text hints at non-numbers, or whose
    samples are nested unequally, is looked at sample by sample.
    """
    if not isinstance(x, list):
        raise BadRecord("missing_field", "x must be a list of numbers")
    n, size = shape[0], math.prod(shape[1:])
    bad: dict[int, BadRecord] = {}
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError):
        arr = None
    if arr is not None and (arr.shape == shape or (arr.ndim == 1 and arr.size == n * size)):
        rows = arr.reshape(n, size)
        if look_closely:
            for i in range(n):
                if not _numbers_only(x[i : i + 1] if arr.ndim > 1 else x[i * size : (i + 1) * size]):
                    bad[i] = BadRecord("bad_shape", _NOT_NUMBERS)
    elif len(x) == n and all(type(sample) is list for sample in x):  # nested per sample, some unequally
        rows = np.zeros((n, size))
        for i, sample in enumerate(x):
            try:
                rows[i] = _json_array(sample, dtype, shape[1:], look_closely).reshape(-1)
            except BadRecord as problem:
                bad[i] = problem
    elif arr is None:
        raise BadRecord("bad_shape", "x must be a flat or nested list of numbers of equal lengths")
    else:
        raise BadRecord("bad_shape", f"x of {list(arr.shape)} values does not fit shape {list(shape)}")
    nan = np.isnan(rows).any(axis=1)  # JSON numbers never parse to NaN (NaN literals are refused): a null
    if dtype == DTYPES["uint8"]:
        fits = ((rows >= 0) & (rows <= 255)).all(axis=1) & (rows == np.round(rows)).all(axis=1)
        refused = ("bad_dtype", "uint8 values must be integers in 0..255")
    else:
        fits = (np.abs(rows) < _FLOAT32_LIMIT).all(axis=1)  # before the cast, which would make them inf
        refused = ("out_of_range", "x has values beyond float32's finite range")
    for i in np.flatnonzero(nan | ~fits).tolist():
        bad.setdefault(i, BadRecord("bad_shape", _NOT_NUMBERS) if nan[i] else BadRecord(*refused))
    if bad:
        rows[list(bad)] = 0
    return rows.reshape(shape).astype(dtype), bad


_NOT_NUMBERS = "x must hold only numbers (no strings, booleans or null)"


def _refuse_values(reason: str, detail: str, arr: np.ndarray) -> None:
    # JSON numbers never parse to NaN (NaN literals are refused): a NaN was a null
    if np.isnan(arr).any():
        raise BadRecord("bad_shape", _NOT_NUMBERS)
    raise BadRecord(reason, detail)


def _numbers_only(x: list) -> bool:
    """Whether a nested list holds only ints and floats (a per-element walk, for suspicious records only)."""
    pending = [x]
    while pending:
        for item in pending.pop():
            if type(item) is list:
                pending.append(item)
            elif type(item) is not int and type(item) is not float:
                return False
    return True
