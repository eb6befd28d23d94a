"""A synthetic source: labelled float feature vectors generated on the fly, in constant memory."""

from __future__ import annotations

import numpy as np

from consumers.record import Message, Poll, Position, Record
from consumers.source import Offsets

_SKIP_CHUNK = 1 << 16  # rows of noise drawn at once when skipping, to bound memory


class SyntheticSource:
    """A :class:`~consumers.source.Source` of ``n_records`` Gaussian feature vectors, one class each.

    Record ``i`` belongs to class ``i % n_classes`` (named ``c0``, ``c1``, ...) and is drawn from
    N(mean of its class, 1) in ``dim`` dimensions; class means are fixed by ``seed``. Nothing is
    held beyond the batch being built, so a stream of any length runs in constant memory (used by
    the long-run memory benchmark).

    Parameters
    ----------
    n_records
        Records before the source is exhausted (>= 0).
    dim
        Feature dimensions (>= 1).
    n_classes
        Number of classes (>= 1).
    seed
        Seed of class means and noise.
    stream
        Stream name in the records' positions (partition 0, offset = record index).
    start_offsets
        ``{(stream, 0): next offset}`` to resume from (as committed by an earlier run): the records
        before it are skipped, and every later record is the same as in an uninterrupted run.

    Examples
    --------
    >>> src = SyntheticSource(3, dim=2, n_classes=2)
    >>> poll = src.poll(0.0, 10)
    >>> [r.label for r in poll.records], poll.records[0].x.shape, src.exhausted
    ([('c0',), ('c1',), ('c0',)], (2,), True)
    """

    poll_timeout_s = 0.0
    fetches_ahead = False

    def __init__(
        self,
        n_records: int,
        *,
        dim: int = 8,
        n_classes: int = 10,
        seed: int = 0,
        stream: str = "synthetic",
        start_offsets: Offsets | None = None,
    ) -> None:
        if n_records < 0:
            raise ValueError(f"n_records must be >= 0, got {n_records}")
        if dim < 1 or n_classes < 1:
            raise ValueError(f"dim and n_classes must be >= 1, got {dim}, {n_classes}")
        self.n_records = n_records
        self.dim = dim
        self.n_classes = n_classes
        self.stream = stream
        self._rng = np.random.default_rng(seed)
        self._means = self._rng.normal(0.0, 2.0, size=(n_classes, dim)).astype(np.float32)
        self._labels = tuple((f"c{k}",) for k in range(n_classes))
        self._next = min(n_records, max(0, (start_offsets or {}).get((stream, 0), 0)))
        self._skip_noise(self._next)
        self.committed: dict[tuple[str, int], int] = dict(start_offsets or {})
        self.exhausted = self._next >= n_records

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        n = min(max_records, self.n_records - self._next)
        if n <= 0:
            self.exhausted = True
            return Poll()
        index = np.arange(self._next, self._next + n)
        classes = index % self.n_classes
        x = (self._means[classes] + self._rng.standard_normal((n, self.dim), dtype=np.float32)).astype(np.float32)
        records = []
        for i, k, row in zip(index.tolist(), classes.tolist(), x, strict=True):
            message = Message(Position(self.stream, 0, i), float(i), None, row.tobytes())
            value = np.frombuffer(message.value, dtype=np.float32)  # shares the message's bytes, as decode does
            records.append(Record(f"{self.stream}-{i}", value, self._labels[k], message.position, float(i), message))
        self._next += n
        self.exhausted = self._next >= self.n_records
        return Poll(records)

    def _skip_noise(self, n: int) -> None:
        """Draw and drop the noise of ``n`` records, so a resumed stream continues the same draws."""
        while n > 0:
            chunk = min(n, _SKIP_CHUNK)
            self._rng.standard_normal((chunk, self.dim), dtype=np.float32)
            n -= chunk

    def commit(self, offsets: Offsets) -> None:
        self.committed.update(offsets)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> SyntheticSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
