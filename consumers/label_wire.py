"""The label message format: a sample's label arriving on a topic of its own, after its features.

A label message's value is a JSON object ``{"id": str, "y": "label" | ["coarse", "fine"]}``; ``id``
names the feature record (wire format, ``y`` null) whose label it is, ``y`` is never null. It is
checked with the same bounds as a feature record's (size, nesting, id and label lengths) before
it joins anything, and decoding never raises: a bad message becomes a :class:`DeadLetter` with one
of the wire format's reasons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from consumers.record import DeadLetter, LabelPath, Message, Position, message_bytes
from consumers.wire import (
    MAX_DETAIL_CHARS,
    MAX_PAYLOAD_BYTES,
    BadRecord,
    _json_body,
    _parse_id,
    _parse_label,
)

MAX_LABEL_MESSAGE_BYTES = 64 * 1024
"""Largest label message (value, key and headers: a waiting label keeps them all, for its dead letter): an id
and a label path fit in far less, so anything bigger is refused unread."""


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """One decoded label message: the id of the sample it labels and the label path."""

    id: str
    label: LabelPath
    position: Position
    timestamp: float
    message: Message


def encode_label(sample_id: str, label: str | list[str]) -> bytes:
    """The JSON value of a label message (for producers and tests)."""
    return json.dumps({"id": sample_id, "y": label}).encode()


def decode_label(message: Message, max_bytes: int = MAX_PAYLOAD_BYTES) -> LabelRecord | DeadLetter:
    """A label message as a :class:`LabelRecord`, or a dead letter saying why it is not one. Never raises."""
    try:
        limit = min(max_bytes, MAX_LABEL_MESSAGE_BYTES)
        size = message_bytes(message)
        if size > limit:
            raise BadRecord("oversized", f"{size} bytes with key and headers > {limit}")
        body, _ = _json_body(message.value)
        sample_id = _parse_id(body.get("id"))
        label = _parse_label(body.get("y"))
        if label is None:
            raise BadRecord("missing_field", "a label message needs y (a label or a label path)")
        return LabelRecord(sample_id, label, message.position, message.timestamp, message)
    except BadRecord as bad:
        return DeadLetter(message, bad.reason, bad.detail)
    except Exception as err:  # a decoder bug must cost one message, never the consumer
        return DeadLetter(message, "internal", f"{type(err).__name__}: {err}"[:MAX_DETAIL_CHARS])
