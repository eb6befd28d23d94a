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
from consumers.wire import encode_json

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
