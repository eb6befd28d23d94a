"""Hostile messages for the decoder: each with the dead-letter reason it must get (``None``: a record).

Every entry is a single message that once crashed, slipped through or could be made to: huge numbers,
deep nesting, wrong types, long ids and labels, broken framing and binary headers. The accepted entries
probe the edges of the limits and must stay accepted.
"""

from __future__ import annotations

import json

import numpy as np

from consumers.record import Message, Position
from consumers.wire import BINARY_TYPE, MAX_ID_CHARS, MAX_LABEL_CHARS, MAX_LABEL_DEPTH

SHAPE = [4, 4, 1]
SIZE = 16


def _json(stream: str, name: str, value: bytes) -> Message:
    return Message(Position(stream, 0, 0), 0.0, name.encode(), value)


def _body(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "h", "x": [7] * SIZE, "shape": SHAPE, "dtype": "uint8", "y": "c0"}
    base.update(fields)
    return base


def _text(x_text: str, **fields: object) -> bytes:
    """A body whose ``x`` is spliced in as raw JSON text (for numbers json.dumps cannot write)."""
    return json.dumps(_body(x="@X@", **fields)).replace('"@X@"', x_text).encode()


def _numbers(*literals: str, fill: str = "0") -> str:
    return "[" + ",".join([*literals, *[fill] * (SIZE - len(literals))]) + "]"


def hostile_json(stream: str = "src") -> list[tuple[str, Message, str | None]]:
    """(name, message, expected reason or None) for the JSON format."""
    good = json.dumps(_body()).encode()
    f32 = {"dtype": "float32"}
    cases: list[tuple[str, bytes, str | None]] = [
        ("good", good, None),
        # numbers: size of the literal, range of the dtype, non-finite literals
        ("int_400_digits", _text(_numbers("9" * 400)), "out_of_range"),
        ("int_5000_digits", _text(_numbers("9" * 5000)), "out_of_range"),
        ("float_5000_digits", _text(_numbers("0." + "1" * 5000), **f32), "out_of_range"),
        ("int_40_digits_beyond_float32", _text(_numbers("1" + "0" * 39), **f32), "out_of_range"),
        ("int_20_digits_beyond_int64_fits_float32", _text(_numbers("9" * 20), **f32), None),
        ("float32_1e300", _text(_numbers("1e300"), **f32), "out_of_range"),
        ("float32_minus_1e39", _text(_numbers("-1e39"), **f32), "out_of_range"),
        ("float32_1e999", _text(_numbers("1e999"), **f32), "out_of_range"),
        ("float32_max_repr", _text(_numbers("3.4028235e38", "-3.4028235e38"), **f32), None),
        ("float32_just_beyond_max", _text(_numbers("3.4028236e38"), **f32), "out_of_range"),
        ("float32_tiny_underflows_to_zero", _text(_numbers("1e-300"), **f32), None),
        ("NaN_literal", _text(_numbers("NaN"), **f32), "non_finite"),
        ("Infinity_literal", _text(_numbers("Infinity"), **f32), "non_finite"),
        ("minus_Infinity_literal", _text(_numbers("-Infinity"), **f32), "non_finite"),
        ("uint8_minus_zero", _text(_numbers("-0", "-0.0")), None),
        ("float32_minus_zero", _text(_numbers("-0", "-0.0"), **f32), None),
        ("uint8_300", _text(_numbers("300")), "bad_dtype"),
        ("uint8_minus_1", _text(_numbers("-1")), "bad_dtype"),
        ("uint8_fraction", _text(_numbers("1.5")), "bad_dtype"),
        ("uint8_integral_float", _text(_numbers("255.0", "1e2")), None),
        # non-numbers in x
        ("x_numeric_string", _text(_numbers('"1"', fill="1")), "bad_shape"),
        ("x_word", _text(_numbers('"abc"')), "bad_shape"),
        ("x_true", _text(_numbers("true")), "bad_shape"),
        ("x_false_among_floats", _text(_numbers("false", fill="0.5"), **f32), "bad_shape"),
        ("x_null", _text(_numbers("null")), "bad_shape"),
        ("x_all_null", _text(_numbers(fill="null"), **f32), "bad_shape"),
        ("x_object", _text(_numbers("{}")), "bad_shape"),
        ("x_huge_strings", json.dumps(_body(x=["a" * 100_000] * SIZE)).encode(), "bad_shape"),
        ("x_ragged", _text("[[1, 2], [3]]", shape=[2, 2]), "bad_shape"),
        ("x_nested_as_another_shape", _text("[[1, 2, 3, 4], [5, 6, 7, 8]]", shape=[4, 2]), "bad_shape"),
        ("x_nested_as_the_shape", _text("[[1, 2], [3, 4]]", shape=[2, 2]), None),
        ("x_too_few", _text("[1, 2, 3]"), "bad_shape"),
        ("x_empty", _text("[]"), "bad_shape"),
        ("x_not_a_list", _text("5"), "missing_field"),
        # nesting
        ("x_100000_brackets", _text("[" * 100_000 + "]" * 100_000), "bad_json"),
        ("x_100000_open_brackets", _text("[" * 100_000), "bad_json"),
        ("y_100000_brackets", json.dumps(_body(y="@Y@")).replace('"@Y@"', "[" * 100_000).encode(), "bad_json"),
        ("x_nested_5_deep", _text("[[[[[1]]]]]", shape=[1]), "bad_json"),
        ("x_nested_4_deep", _text("[[[[1]]]]", shape=[1, 1, 1, 1]), None),
        # labels
        ("label_dict", json.dumps(_body(y={"c0": 1})).encode(), "bad_label"),
        ("label_number", json.dumps(_body(y=5)).encode(), "bad_label"),
        ("label_true", json.dumps(_body(y=True)).encode(), "bad_label"),
        ("label_nested_list", json.dumps(_body(y=[["a"]])).encode(), "bad_label"),
        ("label_list_with_number", json.dumps(_body(y=["a", 1])).encode(), "bad_label"),
        ("label_empty_list", json.dumps(_body(y=[])).encode(), "bad_label"),
        ("label_empty_string", json.dumps(_body(y="")).encode(), "bad_label"),
        ("label_part_too_long", json.dumps(_body(y="l" * (MAX_LABEL_CHARS + 1))).encode(), "bad_label"),
        ("label_part_at_limit", json.dumps(_body(y="l" * MAX_LABEL_CHARS)).encode(), None),
        ("label_1MB", json.dumps(_body(y="l" * 1_000_000)).encode(), "bad_label"),
        ("label_too_deep", json.dumps(_body(y=["l"] * (MAX_LABEL_DEPTH + 1))).encode(), "bad_label"),
        ("label_at_depth_limit", json.dumps(_body(y=["l"] * MAX_LABEL_DEPTH)).encode(), None),
        ("label_lone_surrogate", json.dumps(_body(y="\ud800")).encode(), "bad_label"),
        ("label_spelled_like_literals", json.dumps(_body(y=["true", "false"])).encode(), None),
        # ids
        ("id_100kB", json.dumps(_body(id="i" * 100_000)).encode(), "bad_id"),
        ("id_too_long", json.dumps(_body(id="i" * (MAX_ID_CHARS + 1))).encode(), "bad_id"),
        ("id_at_limit", json.dumps(_body(id="i" * MAX_ID_CHARS)).encode(), None),
        ("id_lone_surrogate", json.dumps(_body(id="\udfff")).encode(), "bad_id"),
        ("id_unicode", json.dumps(_body(id="ß-ñ-猫-😀"), ensure_ascii=False).encode(), None),
        ("id_number", json.dumps(_body(id=5)).encode(), "missing_field"),
        ("id_empty", json.dumps(_body(id="")).encode(), "missing_field"),
        ("id_brackets_and_digits", json.dumps(_body(id="[{" * 50 + "1" * 60)).encode(), None),
        ("id_escaped_quotes", json.dumps(_body(id='a\\"[[[[[[[[\\\\"' + "9" * 50)).encode(), None),
        # framing
        ("utf8_bom", b"\xef\xbb\xbf" + good, "bad_json"),
        ("utf16_with_bom", json.dumps(_body()).encode("utf-16"), "undecodable"),
        ("not_utf8", b"\x80\x81 not utf-8", "undecodable"),
        ("empty_value", b"", "bad_json"),
        ("whitespace_only", b" \n\t ", "bad_json"),
        ("trailing_garbage", good + b" xyz", "bad_json"),
        ("two_objects", good + good, "bad_json"),
        ("surrounding_whitespace", b" \n" + good + b"\r\n ", None),
        ("top_level_array", b"[1, 2, 3]", "bad_json"),
        ("top_level_string", b'"s"', "bad_json"),
        ("10MB_value", good[:-1] + b', "pad": "' + b"p" * 10_000_000 + b'"}', "oversized"),
        ("unknown_fields_ignored", json.dumps(_body(extra=[True, "s", None])).encode(), None),
        # shape and dtype
        ("shape_1e9_floats", json.dumps(_body(shape=[1e9, 1e9])).encode(), "bad_shape"),
        ("shape_1e9_ints", json.dumps(_body(shape=[10**9, 10**9])).encode(), "bad_shape"),
        ("shape_empty", json.dumps(_body(shape=[])).encode(), "bad_shape"),
        ("shape_5_dims", json.dumps(_body(shape=[1, 1, 4, 4, 1])).encode(), "bad_shape"),
        ("shape_boolean", json.dumps(_body(shape=[True] * 16)).encode(), "bad_shape"),
        ("shape_negative", json.dumps(_body(shape=[-4, -4, 1])).encode(), "bad_shape"),
        ("dtype_float64", json.dumps(_body(dtype="float64")).encode(), "bad_dtype"),
        ("dtype_list", json.dumps(_body(dtype=["uint8"])).encode(), "bad_dtype"),
    ]
    return [(name, _json(stream, name, value), reason) for name, value, reason in cases]


def hostile_binary(stream: str = "src") -> list[tuple[str, Message, str | None]]:
    """(name, message, expected reason or None) for the binary format."""
    pixels = bytes(range(SIZE))

    def msg(name: str, value: bytes = pixels, **headers: bytes | None) -> Message:
        base: dict[str, bytes | None] = {"id": b"h", "dtype": b"uint8", "shape": b"[4, 4, 1]", "y": b'"c0"'}
        base.update(headers)
        items = [("content-type", BINARY_TYPE), *((k, v) for k, v in base.items() if v is not None)]
        return Message(Position(stream, 0, 0), 0.0, name.encode(), value, tuple(items))

    f32 = np.ones(SIZE, np.float32)
    nan, inf = f32.copy(), f32.copy()
    nan[3], inf[5] = np.nan, -np.inf
    cases: list[tuple[str, Message, str | None]] = [
        ("good", msg("good"), None),
        ("shape_unclosed", msg("s1", shape=b"[4"), "bad_json"),
        ("shape_1e9_floats", msg("s2", shape=b"[1e9, 1e9]"), "bad_shape"),
        ("shape_1e9_ints", msg("s3", shape=b"[1000000000, 1000000000]"), "bad_shape"),
        ("shape_product_overflows_int64", msg("s4", shape=b"[4294967296, 4294967296, 4294967296]"), "bad_shape"),
        ("shape_100000_brackets", msg("s5", shape=b"[" * 100_000), "oversized"),
        ("shape_1000_brackets", msg("s6", shape=b"[" * 1000 + b"]" * 1000), "bad_json"),
        ("shape_nested", msg("s7", shape=b"[[4, 4, 1]]"), "bad_shape"),
        ("shape_5000_digits", msg("s8", shape=b"[" + b"9" * 5000 + b"]"), "out_of_range"),
        ("shape_NaN", msg("s9", shape=b"[16, NaN]"), "non_finite"),
        ("shape_5_dims", msg("s10", shape=b"[1, 1, 4, 4, 1]"), "bad_shape"),
        ("shape_object", msg("s11", shape=b'{"a": 1}'), "bad_shape"),
        ("shape_trailing_garbage", msg("s12", shape=b"[16] x"), "bad_json"),
        ("shape_missing", msg("s13", shape=None), "missing_field"),
        ("dtype_float64", msg("d1", dtype=b"float64"), "bad_dtype"),
        ("dtype_missing", msg("d2", dtype=None), "missing_field"),
        ("dtype_length_mismatch", msg("d3", dtype=b"float32"), "bad_shape"),
        ("float32_ok", msg("d4", f32.tobytes(), dtype=b"float32"), None),
        ("float32_nan", msg("d5", nan.tobytes(), dtype=b"float32"), "non_finite"),
        ("float32_inf", msg("d6", inf.tobytes(), dtype=b"float32"), "non_finite"),
        ("value_empty", msg("v1", b""), "bad_shape"),
        ("value_one_byte_short", msg("v2", pixels[:-1]), "bad_shape"),
        ("value_10MB", msg("v3", b"\x00" * 10_000_000), "oversized"),
        ("id_100kB", msg("i1", id=b"i" * 100_000), "bad_id"),
        ("id_too_long", msg("i2", id=b"i" * (MAX_ID_CHARS + 1)), "bad_id"),
        ("id_unicode_at_limit", msg("i3", id=("猫" * MAX_ID_CHARS).encode()), None),
        ("id_missing", msg("i4", id=None), "missing_field"),
        ("id_not_utf8", msg("i5", id=b"\xff\xfe"), "undecodable"),
        ("label_dict", msg("y1", y=b'{"c0": 1}'), "bad_label"),
        ("label_number", msg("y2", y=b"5"), "bad_label"),
        ("label_nested_list", msg("y3", y=b'[["a"]]'), "bad_label"),
        ("label_part_too_long", msg("y4", y=json.dumps("l" * (MAX_LABEL_CHARS + 1)).encode()), "bad_label"),
        ("label_too_deep", msg("y5", y=json.dumps(["l"] * (MAX_LABEL_DEPTH + 1)).encode()), "bad_label"),
        ("label_lone_surrogate", msg("y6", y=b'"\\ud800"'), "bad_label"),
        ("label_1MB", msg("y7", y=json.dumps("l" * 1_000_000).encode()), "oversized"),
        ("label_true", msg("y8", y=b"true"), "bad_label"),
        ("label_missing", msg("y9", y=None), "missing_field"),
        ("label_null", msg("y10", y=b"null"), None),
        ("label_path", msg("y11", y=b'["animal", "dog"]'), None),
    ]
    return cases
