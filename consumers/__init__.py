"""Stream sources: where records come from.

A *message* is what a broker or a recorded-stream file holds (key, value bytes, headers,
position). A *record* is a decoded message the learner can use (id, input array, label path).
Every source turns messages into records with :mod:`consumers.wire`, and a message that cannot be
decoded becomes a :class:`~consumers.record.DeadLetter` with a reason, never an exception.
"""

from __future__ import annotations

from consumers.record import DeadLetter, Message, Poll, Position, Record, label_path
from consumers.source import Source, next_offsets

__all__ = [
    "DeadLetter",
    "Message",
    "Poll",
    "Position",
    "Record",
    "Source",
    "label_path",
    "next_offsets",
]
