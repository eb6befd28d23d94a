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

    Two attributes tell the run loop how to drive the source, so it needs no rule per kind:
    ``poll_timeout_s`` is how long its ``poll`` should wait for data (0.0 where data is there at
    once, as in a file; 0.5 for Kafka, whose records arrive over the network), and
    ``fetches_ahead`` is true when the source already fetches and decodes on a thread of its own
    (Kafka), so wrapping it in a :class:`~consumers.prefetch.Prefetcher` would only add a hop.
    """

    exhausted: bool
    poll_timeout_s: float
    fetches_ahead: bool

    def poll(self, timeout_s: float, max_records: int) -> Poll: ...

    def commit(self, offsets: Offsets) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Source: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Progressing(Protocol):
    """A finite source that knows how far through it is (a file): progress bars estimate the total from it."""

    @property
    def fraction_read(self) -> float:
        """Share of the source read so far, 0-1."""
        ...


@runtime_checkable
class Instrumented(Protocol):
    """A source in a consumer group that reports lag, assignment and decode times (Kafka).

    ``assigned_at`` is the ``time.monotonic()`` of the first partition assignment (None before),
    so a caller can tell "not ready yet" from "ready, nothing to read".
    """

    assigned_at: float | None

    def lag(self) -> dict[tuple[str, int], int]:
        """Records not yet handed to the learner per assigned (topic, partition).

        The broker's end offset minus the next offset the learner will get, so records fetched
        ahead but not yet handed over count; refreshed even while no records arrive.
        """
        ...

    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition) pairs this consumer owns now."""
        ...

    def take_decode_seconds(self) -> list[float]:
        """Decode wall times since the last call."""
        ...


class NextOffsets(dict[tuple[str, int], int]):
    """Next offsets per (stream, partition), as :func:`next_offsets` gives them, and, in ``within``, how many
    samples of the message at that offset are already processed, for a partition whose last processed
    message (wire format 2, several samples) is only partly done.

    The offsets alone are what Kafka commits: a message counts as consumed once all its samples are. A
    checkpoint keeps ``within`` too, so a restart from it skips exactly the samples already learned.
    """

    def __init__(self, offsets: Offsets | None = None, within: Mapping[tuple[str, int], int] | None = None) -> None:
        super().__init__(offsets or {})
        self.within: dict[tuple[str, int], int] = dict(within_of(offsets or {}) if within is None else within)

    def advance(self, offsets: Offsets) -> None:
        """Move to ``offsets`` (newer ones, e.g. from the next batch): their ``within`` replaces the old one."""
        self.update(offsets)
        for key in offsets:
            self.within.pop(key, None)
        self.within.update(within_of(offsets))


def within_of(offsets: Offsets) -> dict[tuple[str, int], int]:
    """Samples already processed of the message at each partition's next offset (none: a plain mapping)."""
    return dict(offsets.within) if isinstance(offsets, NextOffsets) else {}


def next_offsets(positions: Iterable[Position]) -> NextOffsets:
    """Offsets to commit after processing ``positions``: per partition, the offset after the last whole message.

    A message of several samples (wire format 2) whose last sample is not among ``positions`` (nor before
    them) is not done: its own offset is the next one, and ``within`` says how many of its samples are.

    >>> next_offsets([Position("t", 0, 4), Position("t", 0, 5), Position("t", 1, 0)])
    {('t', 0): 6, ('t', 1): 1}
    >>> done = next_offsets([Position("t", 0, 7, 0, 3), Position("t", 0, 7, 1, 3)])
    >>> done, done.within
    ({('t', 0): 7}, {('t', 0): 2})
    """
    last: dict[tuple[str, int], Position] = {}
    for p in positions:
        key = (p.stream, p.partition)
        seen = last.get(key)
        if seen is None or (p.offset, p.index) > (seen.offset, seen.index):
            last[key] = p
    out = NextOffsets()
    for key, p in last.items():
        if p.ends_message:
            out[key] = p.offset + 1
        else:
            out[key] = p.offset
            out.within[key] = p.index + 1
    return out
