"""What a decoded entry holds in memory, the measure of the byte bounds on read-ahead and pending stores."""

from __future__ import annotations

import numpy as np

from consumers.label_wire import decode_label, encode_label
from consumers.record import Message, Position, held_bytes
from consumers.wire import decode_samples, encode_batch_binary, encode_binary, encode_json


def _message(value: bytes, headers: list[tuple[str, bytes]], key: bytes = b"k") -> Message:
    return Message(Position("t", 0, 0), 0.0, key, value, tuple(headers))


def test_a_binary_record_counts_its_message_once_and_its_array_not_again() -> None:
    value, headers = encode_binary("a", np.zeros(256, np.float32), "c")
    (record,) = decode_samples(_message(value, headers), 1 << 20)
    raw = len(value) + 1 + sum(len(n) + len(v) for n, v in headers)
    assert held_bytes(record) == raw  # the array is a view on the value


def test_a_json_record_counts_its_array_too() -> None:
    value, headers = encode_json("a", np.zeros(256, np.float32), "c")
    (record,) = decode_samples(_message(value, headers), 1 << 20)
    assert held_bytes(record) == len(value) + 1 + sum(len(n) + len(v) for n, v in headers) + 256 * 4


def test_the_samples_of_a_message_share_its_bytes() -> None:
    value, headers = encode_batch_binary(["a", "b", "c", "d"], np.zeros((4, 64), np.float32), ["x"] * 4)
    records = decode_samples(_message(value, headers), 1 << 20)
    raw = len(value) + 1 + sum(len(n) + len(v) for n, v in headers)
    assert sum(map(held_bytes, records)) == raw - raw % 4


def test_headers_count_a_label_message_with_a_large_junk_header_is_not_small() -> None:
    label = decode_label(_message(encode_label("a", "cat"), [("junk", b"j" * 512 * 1024)], key=None))
    assert held_bytes(label) > 512 * 1024
