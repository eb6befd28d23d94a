"""Wire format 2: many samples per message, dead letters per sample, exact positions."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from consumers.dlq import dead_letter_message
from consumers.record import DeadLetter, Message, Position, Record
from consumers.source import NextOffsets, next_offsets
from consumers.wire import (
    BINARY_TYPE,
    MAX_SAMPLES,
    decode,
    decode_samples,
    encode_batch_binary,
    encode_batch_json,
    encode_json,
    sample_message,
)

AT = Position("t", 2, 40)
LABELS = [["animal", "dog"], "cat", None, "cat"]


def message(value: bytes, headers=()) -> Message:
    return Message(AT, 3.5, b"k", value, tuple(headers))


def json_message(body: dict) -> Message:
    return message(json.dumps(body).encode())


def verdicts(decoded: list) -> list[str]:
    return ["ok" if isinstance(d, Record) else d.reason for d in decoded]


@pytest.mark.parametrize("encode", [encode_batch_json, encode_batch_binary])
@pytest.mark.parametrize(
    "x",
    [np.arange(4 * 12, dtype=np.uint8).reshape(4, 2, 2, 3), np.linspace(-1, 1, 4 * 5, dtype=np.float32).reshape(4, 5)],
)
def test_round_trip_gives_each_sample_its_record_and_position(encode, x: np.ndarray) -> None:
    value, headers = encode(["a", "b", "c", "d"], x, LABELS)
    assert dict(headers)["wire-version"] == b"2"
    decoded = decode_samples(message(value, headers))
    assert [r.id for r in decoded] == ["a", "b", "c", "d"]
    assert [r.label for r in decoded] == [("animal", "dog"), ("cat",), None, ("cat",)]
    assert [r.position for r in decoded] == [Position("t", 2, 40, i, 4) for i in range(4)]
    for i, record in enumerate(decoded):
        assert record.x.dtype == x.dtype and record.x.shape == x.shape[1:] and record.timestamp == 3.5
        np.testing.assert_array_equal(record.x, x[i])


def test_version_1_messages_decode_as_before_and_decode_refuses_a_batch() -> None:
    value, headers = encode_json("s-1", np.ones(3, np.float32), "cat")
    [record] = decode_samples(message(value, headers))
    assert record.position == AT and record.position.ends_message
    value, headers = encode_batch_json(["a", "b"], np.ones((2, 3), np.float32), ["x", "y"])
    dead = decode(message(value, headers))
    assert isinstance(dead, DeadLetter) and dead.reason == "bad_shape"
    # a batch of one is fine for either entry point
    value, headers = encode_batch_binary(["a"], np.ones((1, 3), np.float32), ["x"])
    assert isinstance(decode(message(value, headers)), Record)


def test_a_bad_sample_is_a_dead_letter_of_its_own_and_the_others_are_records() -> None:
    body = {
        "ids": ["a", "b", "a", "", 7, "f", "g", "h", "i"],
        "x": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [300, 1], [1.5, 2], [1, None], [1, "2"]],
        "shape": [9, 2],
        "dtype": "uint8",
        "ys": ["p", {"q": 1}, "r", "s", "t", "u", "v", "w", "z"],
    }
    decoded = decode_samples(json_message(body))
    assert verdicts(decoded) == [
        "ok",
        "bad_label",  # not a string or list of strings
        "bad_id",  # repeats sample 0's id
        "missing_field",  # empty id
        "missing_field",  # not a string
        "bad_dtype",  # 300 is not a uint8
        "bad_dtype",  # 1.5 is not an integer
        "bad_shape",  # null is not a number
        "bad_shape",  # "2" is not a number
    ]
    assert [d.message.position.index for d in decoded] == list(range(9))


def test_a_sample_nested_unlike_the_others_is_refused_alone() -> None:
    body = {"ids": ["a", "b", "c"], "x": [[1], [2], [3, 4, 5]], "shape": [3, 1], "dtype": "float32"}
    assert verdicts(decode_samples(json_message(body))) == ["ok", "ok", "bad_shape"]


def test_binary_bad_samples_non_finite_and_labels() -> None:
    x = np.ones((4, 3), np.float32)
    x[1, 2] = np.inf
    value, headers = encode_batch_binary(["a", "b", "c", "d"], x, ["p", "q", "r", "s"])
    headers = [(k, json.dumps(["p", "q", ["r", 5], "s"]).encode() if k == "ys" else v) for k, v in headers]
    assert verdicts(decode_samples(message(value, headers))) == ["ok", "non_finite", "bad_label", "ok"]


def test_json_float_samples_beyond_float32_are_refused_alone() -> None:
    body = {"ids": ["a", "b"], "x": [1e39, 1.0], "shape": [2, 1], "dtype": "float32", "ys": ["p", "q"]}
    assert verdicts(decode_samples(json_message(body))) == ["out_of_range", "ok"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ids": ["a", "b"]}, "bad_shape"),  # 2 ids for 3 samples
        ({"ys": ["p"]}, "bad_shape"),
        ({"shape": [3]}, "bad_shape"),  # no sample dimension
        ({"shape": [3, 1, 1, 1, 1, 1]}, "bad_shape"),  # a sample of 5 dimensions
        ({"dtype": "float64"}, "bad_dtype"),
        ({"ids": []}, "missing_field"),
        ({"ids": "abc"}, "missing_field"),
        ({"ys": "p"}, "missing_field"),
        ({"x": [1, 2]}, "bad_shape"),  # too few values for the envelope
        ({"x": [1, [2], 3]}, "bad_shape"),  # ragged, and not nested per sample: no sample to blame
        ({"id": "a"}, "bad_json"),  # version 1 and 2 fields mixed
    ],
)
def test_a_bad_envelope_is_one_dead_letter_for_the_message(change: dict, reason: str) -> None:
    body = {"ids": ["a", "b", "c"], "x": [1, 2, 3], "shape": [3, 1], "dtype": "float32", "ys": ["p", "q", None]}
    [dead] = decode_samples(json_message({**body, **change}))
    assert isinstance(dead, DeadLetter) and dead.reason == reason
    assert dead.message.position == AT


def test_samples_per_message_are_bounded() -> None:
    n = MAX_SAMPLES + 1
    body = {"ids": [f"s{i}" for i in range(n)], "x": [0] * n, "shape": [n, 1], "dtype": "uint8"}
    [dead] = decode_samples(json_message(body))
    assert dead.reason == "oversized"
    with pytest.raises(ValueError, match="1-4096 ids"):
        encode_batch_binary([f"s{i}" for i in range(n)], np.zeros((n, 1), np.uint8), [None] * n)


def test_binary_envelope_and_header_limits() -> None:
    value, headers = encode_batch_binary(["a", "b"], np.ones((2, 3), np.float32), ["p", "q"])
    ok = dict(headers)
    assert decode_samples(message(value[:-4], headers))[0].reason == "bad_shape"
    for name, raw, reason in [
        ("ids", b'["a"]', "bad_shape"),
        ("ids", b"[" + b'"a",' * 300_000 + b'"b"]', "oversized"),
        ("ys", b'[[[["p"]]]]', "bad_json"),
        ("shape", b"[2, 3, 1, 1, 1, 1]", "bad_shape"),
        ("dtype", b"int8", "bad_dtype"),
        ("ys", None, "missing_field"),
    ]:
        changed = {**ok, name: raw}
        [dead] = decode_samples(message(value, [(k, v) for k, v in changed.items() if v is not None]))
        assert dead.reason == reason, (name, dead)


def test_json_depth_allows_the_batch_dimension_only_in_version_2() -> None:
    nested = [[[[[1]]]]]  # a batch of one 1x1x1x1 sample: x nested 5 deep, the object makes 6
    body = {"ids": ["a"], "x": nested, "shape": [1, 1, 1, 1, 1], "dtype": "uint8", "ys": [None]}
    assert verdicts(decode_samples(json_message(body))) == ["ok"]
    v1 = {"id": "a", "x": nested, "shape": [1, 1, 1, 1], "dtype": "uint8"}
    assert decode_samples(json_message(v1))[0].reason == "bad_json"
    too_deep = {**body, "x": [nested]}
    assert decode_samples(json_message(too_deep))[0].reason == "bad_json"


def test_a_dead_sample_is_stored_alone_and_decodes_to_its_own_fault() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    x[2, 0] = np.nan
    value, headers = encode_batch_binary(["a", "b", "c", "d"], x, LABELS)
    dead = decode_samples(message(value, headers))[2]
    stored = dead_letter_message(dead)
    assert stored.value == x[2].tobytes() and stored.key == b"k"
    named = dict(stored.headers)
    assert named["content-type"] == BINARY_TYPE and named["ids"] == b'["c"]' and named["ys"] == b"[null]"
    assert named["shape"] == b"[1, 3]" and named["reason"] == b"non_finite"
    assert (named["source-offset"], named["source-sample"], named["source-samples"]) == (b"40", b"2", b"4")
    assert verdicts(decode_samples(stored)) == ["non_finite"]
    alone = sample_message(dead.message)
    assert sample_message(alone) is alone  # kept alone (a delayed-label checkpoint does), it stays alone
    assert dead_letter_message(DeadLetter(alone, dead.reason, dead.detail)).headers == stored.headers

    body = {"ids": ["a", "b"], "x": [[1, 2], [3, 300]], "shape": [2, 2], "dtype": "uint8", "ys": ["p", "q"]}
    stored = dead_letter_message(decode_samples(json_message(body))[1])
    assert json.loads(stored.value) == {"ids": ["b"], "x": [[3, 300]], "shape": [1, 2], "dtype": "uint8", "ys": ["q"]}
    assert dict(stored.headers)["source-sample"] == b"1"
    assert verdicts(decode_samples(stored)) == ["bad_dtype"]


def test_a_whole_message_dead_letter_is_stored_unchanged() -> None:
    m = json_message({"ids": ["a"], "x": [1], "shape": [1, 1], "dtype": "float64"})
    [dead] = decode_samples(m)
    assert sample_message(dead.message) is m
    assert "source-sample" not in dict(dead_letter_message(dead).headers)


def test_next_offsets_commit_a_message_only_once_all_its_samples_are_done() -> None:
    half = next_offsets([Position("t", 0, 7, i, 5) for i in range(3)] + [Position("t", 1, 2)])
    assert half == {("t", 0): 7, ("t", 1): 3} and half.within == {("t", 0): 3}
    done = next_offsets([Position("t", 0, 7, i, 5) for i in range(3, 5)])
    assert done == {("t", 0): 8} and done.within == {}
    progress = NextOffsets()
    progress.advance(half)
    assert progress.within == {("t", 0): 3}
    progress.advance(done)
    assert progress == {("t", 0): 8, ("t", 1): 3} and progress.within == {}
    # dead letters of single samples count like records
    dead = DeadLetter(Message(Position("t", 0, 9, 4, 5), 0.0, None, b""), "bad_id")
    assert next_offsets([dead.message.position]) == {("t", 0): 10}


@pytest.mark.parametrize("encode", [encode_batch_json, encode_batch_binary])
def test_every_sample_of_a_message_dead_lettered_parses_the_message_once(encode, monkeypatch) -> None:
    """Each dead sample is stored alone; cutting it out must not parse the whole message once per sample
    (4,096 samples of a few MiB each would cost minutes of CPU for one message)."""
    n = 50
    x = np.full((n, 3), 1.0, dtype=np.float32)
    value, headers = encode([f"s{i}" for i in range(n)], x, ["c"] * n)
    if encode is encode_batch_json:
        value = value.replace(b"1.0", b"1e39")  # every sample beyond float32
    else:
        headers = [(k, v.replace(b'"c"', b"7") if k == "ys" else v) for k, v in headers]  # every label bad
    message = Message(Position("t", 0, 3), 0.0, None, value, tuple(headers))
    dead = decode_samples(message)
    assert len(dead) == n and all(isinstance(d, DeadLetter) for d in dead)
    parts = {value, *(v for _, v in headers)}
    parsed: list[bytes] = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: parsed.append(s) or loads(s, *a, **k))
    stored = [dead_letter_message(d) for d in dead]
    assert len([s for s in parsed if s in parts]) <= 3  # each part of the message parsed once, not once per sample
    assert [decode_samples(s)[0].reason for s in stored] == [d.reason for d in dead]  # each sample alone


def test_a_shape_larger_than_the_message_could_spell_is_refused_before_any_allocation() -> None:
    """Samples nested one list each are laid out in rows of the declared size: 132 bytes once declared 320 MB."""
    body = {"ids": ["a", "b", "c", "d"], "shape": [4, 10_000_000], "x": [[], [], [], []], "dtype": "float32"}
    small = message(json.dumps(body, separators=(",", ":")).encode())
    assert len(small.value) < 100
    tracemalloc.start()
    try:
        decoded = decode_samples(small)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024
    [dead] = decoded
    assert dead.reason == "bad_shape" and "40000000 values cannot fit in 82 bytes" in dead.detail
    # the tightest message that spells its shape (a digit and a comma per value) still decodes
    tight = {"ids": ["a", "b"], "shape": [2, 3], "x": [[0, 1, 2], [3, 4, 5]], "dtype": "uint8"}
    assert verdicts(decode_samples(json_message(tight))) == ["ok", "ok"]
