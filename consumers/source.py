"""The Source protocol every stream source implements (Kafka, recorded files, builders)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from consumers.record import Poll, Position

Offsets = Mapping[tuple[str, int], int]
"""Next offset to consume per (stream, partition): last processed offset + 1, as in Kafka."""


@runtime_checkable
class Source(Protocol):
    """A single-pass stream of records in order.

    ``poll`` returns the next micro-batch (possibly empty when nothing arrived within the
    timeout). ``commit`` marks everything before the given offsets as processed; a source that
    is restarted resumes from its last commit. Leaving a ``with`` block on an exception must not
    commit, so an unprocessed record is never silently skipped. ``exhausted`` turns true when a
    finite source (a file) has nothing more to give; an unbounded one (Kafka) never sets it.
    """

    exhausted: bool

    def poll(self, timeout_s: float, max_records: int) -> Poll: ...

    def commit(self, offsets: Offsets) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Source: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Instrumented(Protocol):
    """A source that reports consumer lag and decode times (Kafka); the run loop publishes them."""

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the high watermark per (topic, partition) not yet handed to the learner."""
        ...

    def take_decode_seconds(self) -> list[float]:
        """Decode wall times since the last call."""
        ...


def next_offsets(positions: Iterable[Position]) -> dict[tuple[str, int], int]:
    """Offsets to commit after processing ``positions``: highest offset + 1 per partition.

    >>> next_offsets([Position("t", 0, 4), Position("t", 0, 5), Position("t", 1, 0)])
    {('t', 0): 6, ('t', 1): 1}
    """
    out: dict[tuple[str, int], int] = {}
    for p in positions:
        key = (p.stream, p.partition)
        out[key] = max(out.get(key, 0), p.offset + 1)
    return out
