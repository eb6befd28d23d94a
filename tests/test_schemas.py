"""The published JSON Schemas of feature records and label messages agree with the encoders and decoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from consumers.label_wire import decode_label, encode_label
from consumers.record import DeadLetter, Message, Position
from consumers.wire import decode_samples, encode_batch_binary, encode_batch_json, encode_json

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def validator(name: str) -> Draft202012Validator:
    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    registry = Registry().with_resources(
        (uri, Resource.from_contents(s)) for s in schemas.values() for uri in (s["$id"], s["$id"].rsplit("/", 1)[1])
    )
    Draft202012Validator.check_schema(schemas[name])
    return Draft202012Validator(schemas[name], registry=registry)


def test_encoded_feature_records_match_their_schema_with_or_without_a_label() -> None:
    features = validator("feature-record.schema.json")
    for label in (None, "dog", ["animal", "dog"]):
        features.validate(json.loads(encode_json("s-1", np.zeros((2, 2), dtype=np.uint8), label)[0]))
    assert not features.is_valid({"id": "s-1", "x": [1], "shape": [1], "dtype": "float64", "y": None})


def test_encoded_batches_match_their_schema() -> None:
    features = validator("feature-record.schema.json")
    x = np.zeros((3, 2, 2), dtype=np.uint8)
    features.validate(json.loads(encode_batch_json(["a", "b", "c"], x, [None, "dog", ["animal", "dog"]])[0]))
    # the binary encoding's headers hold the same fields as the JSON one
    headers = dict(encode_batch_binary(["a", "b"], np.ones((2, 4), np.float32), ["dog", None])[1])
    fields = {name: json.loads(headers[name]) for name in ("ids", "shape", "ys")}
    features.validate({**fields, "x": [], "dtype": headers["dtype"].decode()})


@pytest.mark.parametrize(
    "body",
    [
        {"ids": ["a", "b"], "x": [1, 2], "shape": [2, 1], "dtype": "uint8", "ys": ["dog", None]},
        {"ids": ["a"], "x": [1], "shape": [1, 1], "dtype": "uint8"},
        {"id": "a", "x": [1], "shape": [1], "dtype": "uint8", "y": "dog"},
        {"ids": ["a"], "x": [1], "shape": [1], "dtype": "uint8"},  # no sample dimension
        {"ids": ["a"], "x": [1], "shape": [1, 1, 1, 1, 1, 1], "dtype": "uint8"},  # a 5-d sample
        {"ids": [], "x": [], "shape": [1, 1], "dtype": "uint8"},
        {"ids": ["a"], "id": "a", "x": [1], "shape": [1, 1], "dtype": "uint8"},  # both versions' fields
        {"ids": ["a"], "x": [1], "shape": [1, 1], "dtype": "float64"},
        {"ids": ["a"], "x": [1], "shape": [1, 1], "dtype": "uint8", "ys": [["animal", 3]]},
        {"ids": ["a"], "x": [1], "shape": [1, 1], "dtype": "uint8", "ys": "dog"},
        {"ids": [""], "x": [1], "shape": [1, 1], "dtype": "uint8"},
    ],
)
def test_the_feature_schema_accepts_exactly_what_the_decoder_learns_from(body: dict) -> None:
    """For messages whose x fits the shape (the schema cannot count values): valid iff every sample is a record."""
    decoded = decode_samples(Message(Position("features", 0, 0), 0.0, None, json.dumps(body).encode()))
    learnable = all(not isinstance(d, DeadLetter) for d in decoded)
    assert validator("feature-record.schema.json").is_valid(body) == learnable


@pytest.mark.parametrize(
    "body",
    [
        {"id": "a", "y": "dog"},
        {"id": "a", "y": ["animal", "dog"]},
        {"id": "a", "y": None},
        {"id": "", "y": "dog"},
        {"y": "dog"},
        {"id": "a", "y": []},
        {"id": "a", "y": ["animal", 3]},
        {"id": "a", "y": ["x"] * 9},
    ],
)
def test_the_label_schema_accepts_exactly_what_the_decoder_accepts(body: dict) -> None:
    decoded = decode_label(Message(Position("labels", 0, 0), 0.0, None, json.dumps(body).encode()))
    assert validator("label-message.schema.json").is_valid(body) == (not isinstance(decoded, DeadLetter))


def test_encoded_label_messages_match_their_schema() -> None:
    validator("label-message.schema.json").validate(json.loads(encode_label("a", ["animal", "dog"])))
