from __future__ import annotations

import json

import numpy as np
import pytest

from consumers.record import DeadLetter, Message, Position, Record
from consumers.wire import (
    BINARY_TYPE,
    MAX_ENVELOPE_BYTES,
    MAX_LABEL_CHARS,
    MAX_LABEL_DEPTH,
    REASONS,
    decode,
    encode_binary,
    encode_json,
)
from tests.consumers.streams import MAX_BYTES, bad_messages


@pytest.mark.parametrize("encode", [encode_json, encode_binary])
@pytest.mark.parametrize(
    ("x", "label"),
    [
        (np.arange(12, dtype=np.uint8).reshape(2, 2, 3), ["animal", "dog"]),
        (np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 2, 3), "cat"),
        (np.ones(5, np.float32), None),
        (np.zeros(3, np.uint8), ["😀" * MAX_LABEL_CHARS] * MAX_LABEL_DEPTH),  # the largest label allowed
    ],
)
def test_round_trip(encode, x: np.ndarray, label) -> None:
    value, headers = encode("s-1", x, label)
    record = decode(Message(Position("t", 3, 9), 1.5, b"k", value, tuple(headers)))
    assert isinstance(record, Record)
    assert record.id == "s-1" and record.position == Position("t", 3, 9) and record.timestamp == 1.5
    assert record.x.dtype == x.dtype and record.x.shape == x.shape
    np.testing.assert_array_equal(record.x, x)
    assert record.label == (None if label is None else (label,) if isinstance(label, str) else tuple(label))


@pytest.mark.parametrize(("reason", "message"), sorted(bad_messages().items()))
def test_each_bad_kind_gets_its_reason(reason: str, message: Message) -> None:
    dead = decode(message, MAX_BYTES)
    assert isinstance(dead, DeadLetter)
    assert dead.reason == reason and dead.reason in REASONS
    assert dead.message is message  # the original bytes travel on untouched


def test_an_empty_value_says_so_for_features_and_labels() -> None:
    """A tombstone (read as an empty value) is named as such, not as JSON's "Expecting value"."""
    from consumers.label_wire import decode_label

    message = Message(Position("t", 0, 4), 1.0, b"k", b"", ())
    for dead in (decode(message), decode_label(message)):
        assert isinstance(dead, DeadLetter) and dead.reason == "bad_json"
        assert dead.detail == "empty value (a tombstone, or a message without a value)"


@pytest.mark.parametrize("encode", [encode_json, encode_binary])
def test_key_and_headers_beyond_their_bound_are_oversized(encode) -> None:
    """A small value with megabytes of extra headers or key: a waiting sample would keep them all."""
    value, headers = encode("s-1", np.ones(4, np.float32), "cat")
    half = MAX_ENVELOPE_BYTES // 2
    fits = Message(Position("t", 0, 1), 1.0, b"k" * half, value, (*headers, ("extra", b"h" * (half - 1000))))
    assert isinstance(decode(fits), Record)
    for key, extra in ((b"k" * half, b"h" * half), (b"k" * (MAX_ENVELOPE_BYTES + 1), b"")):
        dead = decode(Message(Position("t", 0, 2), 1.0, key, value, (*headers, ("extra", extra))))
        assert isinstance(dead, DeadLetter) and dead.reason == "oversized"
        assert dead.detail.startswith("key and headers of") and dead.detail.endswith(f"> {MAX_ENVELOPE_BYTES}")


def test_every_reason_is_reachable() -> None:
    assert set(bad_messages()) == set(REASONS) - {"internal"}


def test_an_unexpected_error_costs_one_record_not_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers import wire

    def broken(*args: object) -> None:
        raise ZeroDivisionError("x" * 1000)

    monkeypatch.setattr(wire, "_json_array", broken)
    value, headers = encode_json("a", np.ones(4, np.float32), "cat")
    dead = decode(Message(Position("t", 0, 0), 0.0, None, value, tuple(headers)))
    assert isinstance(dead, DeadLetter) and dead.reason == "internal" and "internal" in REASONS
    assert dead.detail.startswith("ZeroDivisionError: xxx") and len(dead.detail) == wire.MAX_DETAIL_CHARS


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"dtype": b"uint8", "shape": b"[4]", "y": b"null"}, "missing_field"),  # no id
        ({"id": b"a", "dtype": b"uint8", "shape": b"[5]", "y": b"null"}, "bad_shape"),  # 4 bytes for 5
        ({"id": b"a", "dtype": b"uint8", "shape": b"[4", "y": b"null"}, "bad_json"),
        ({"id": b"a", "dtype": b"uint8", "shape": b"[4]", "y": b"[1]"}, "bad_label"),
        ({"id": b"\xff", "dtype": b"uint8", "shape": b"[4]", "y": b"null"}, "undecodable"),
    ],
)
def test_binary_header_errors(headers: dict[str, bytes], reason: str) -> None:
    items = (("content-type", BINARY_TYPE), *headers.items())
    dead = decode(Message(Position("t", 0, 0), 0.0, None, b"\x01\x02\x03\x04", items))
    assert isinstance(dead, DeadLetter) and dead.reason == reason


def test_unknown_content_type_and_json_edge_cases() -> None:
    unknown = Message(Position("t", 0, 0), 0.0, None, b"{}", (("content-type", b"text/csv"),))
    assert decode(unknown).reason == "undecodable"
    not_object = Message(Position("t", 0, 0), 0.0, None, b"[1, 2]")
    assert decode(not_object).reason == "bad_json"
    out_of_range = json.dumps({"id": "a", "x": [1, 2, 3, 300], "shape": [4], "dtype": "uint8", "y": None})
    assert decode(Message(Position("t", 0, 0), 0.0, None, out_of_range.encode())).reason == "bad_dtype"


def test_oversized_limit_is_configurable() -> None:
    value, headers = encode_binary("a", np.zeros(100, np.uint8), None)
    message = Message(Position("t", 0, 0), 0.0, None, value, tuple(headers))
    assert isinstance(decode(message, max_bytes=100), Record)
    assert decode(message, max_bytes=99).reason == "oversized"


def test_remembered_headers_still_check_every_payload_and_stay_bounded() -> None:
    from consumers import wire

    value, headers = encode_binary("a", np.ones(4, np.float32), "cat")
    assert isinstance(decode(Message(Position("t", 0, 0), 0.0, None, value, tuple(headers))), Record)
    short = decode(Message(Position("t", 0, 1), 0.0, None, value[:-4], tuple(headers)))  # same headers, 3 floats
    assert isinstance(short, DeadLetter) and short.reason == "bad_shape"
    nan = decode(Message(Position("t", 0, 2), 0.0, None, np.full(4, np.nan, np.float32).tobytes(), tuple(headers)))
    assert isinstance(nan, DeadLetter) and nan.reason == "non_finite"
    for k in range(wire._PARSED_MAX + 10):  # more distinct labels than the memo holds
        value, headers = encode_binary(f"s{k}", np.ones(2, np.float32), f"class-{k}")
        record = decode(Message(Position("t", 0, k), 0.0, None, value, tuple(headers)))
        assert record.label == (f"class-{k}",)
    assert wire._binary_label.cache_info().currsize <= wire._PARSED_MAX
