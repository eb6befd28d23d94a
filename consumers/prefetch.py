"""A source wrapper that polls ahead on a background thread while the learner computes.

Decoding (and, for Kafka, fetching) then overlaps with the learner's step instead of adding to
it. Every call into the wrapped source -- ``poll`` and ``commit`` alike -- is made from the one
background thread while it runs, because sources such as a Kafka consumer are not thread-safe.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from consumers.record import Poll
from consumers.source import Offsets, Source

_END = object()


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


class Prefetcher:
    """Poll ``source`` up to ``depth`` micro-batches ahead, in order, on a background thread.

    ``poll`` hands out the queued batches in stream order, splitting one when the caller asks for
    fewer records than it holds. ``commit`` is queued and applied by the background thread before
    its next poll (and at the latest by ``close``), so commits reach the wrapped source in order and
    never race its ``poll``. An error raised by the source's ``poll`` is re-raised by the next
    ``poll`` here. ``exhausted`` turns true once the source is exhausted (or ``max_records`` were
    polled) and everything queued has been handed out. It reads ahead on a thread of its own, so
    ``fetches_ahead`` is true; ``poll_timeout_s`` is the wrapped source's.

    Parameters
    ----------
    source
        The source to read ahead of; ``close`` closes it.
    depth
        Micro-batches held ready (>= 1).
    batch_size
        Records asked of the source per poll (>= 1); use the run loop's batch size.
    max_records
        Stop polling after this many messages (good or bad), as the run loop's ``max_records`` does,
        so the read-ahead never consumes past what the caller will process; None: no limit.
    timeout_s
        Timeout of each poll of the wrapped source (>= 0).
    wait_s
        Shortest wait of :meth:`poll` for a ready batch, so a caller polling with timeout 0 blocks
        briefly instead of spinning on the core the background thread needs (>= 0).

    Examples
    --------
    >>> from consumers.synthetic import SyntheticSource
    >>> with Prefetcher(SyntheticSource(25, dim=4), depth=2, batch_size=10) as src:
    ...     sizes = [len(src.poll(1.0, 10)) for _ in range(4)]
    >>> sizes, src.exhausted
    ([10, 10, 5, 0], True)
    """

    def __init__(
        self,
        source: Source,
        *,
        depth: int = 2,
        batch_size: int = 10,
        max_records: int | None = None,
        timeout_s: float = 1.0,
        wait_s: float = 0.05,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0 or None, got {max_records}")
        if timeout_s < 0 or wait_s < 0:
            raise ValueError(f"timeout_s and wait_s must be >= 0, got {timeout_s}, {wait_s}")
        self.source = source
        self.depth = depth
        self.batch_size = batch_size
        self.max_records = max_records
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.exhausted = False
        self.poll_timeout_s = source.poll_timeout_s
        self.fetches_ahead = True
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._carry: Poll | None = None
        self._commits: list[Offsets] = []
        self._lock = threading.Lock()
        self._running = True  # guarded by _lock: while true, the thread owns the source
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        """The next ready records (at most ``max_records``); empty if none came within the wait."""
        if self._carry is None and not self.exhausted:
            try:
                item = self._ready.get(timeout=max(timeout_s, self.wait_s))
            except queue.Empty:
                return Poll()
            if item is _END:
                self.exhausted = True
                return Poll()
            if isinstance(item, _Failure):
                self.exhausted = True
                raise item.error
            self._carry = item
        if self._carry is None:
            return Poll()
        out, self._carry = _split(self._carry, max_records)
        return out

    @property
    def fraction_read(self) -> float:
        """The wrapped source's share read (an AttributeError where it has none: then this is no progressing source)."""
        return self.source.fraction_read

    def commit(self, offsets: Offsets) -> None:
        """Queue a commit for the background thread; applied directly once it has stopped."""
        with self._lock:
            if self._running:
                self._commits.append(dict(offsets))
                return
        self.source.commit(offsets)

    def close(self) -> None:
        """Stop the thread, apply queued commits, close the source. Idempotent."""
        self._shutdown()
        if not self._closed:
            self._closed = True
            self.source.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        # Queued commits cover records the caller finished, so they are applied even on error;
        # the wrapped source's own __exit__ decides what leaving on an exception means.
        self._shutdown()
        if not self._closed:
            self._closed = True
            self.source.__exit__(*exc)

    def _shutdown(self) -> None:
        self._stop.set()
        self._thread.join()  # a blocked put re-checks the stop flag every 50 ms
        self._flush_commits()

    def _run(self) -> None:
        polled = 0
        try:
            while not self._stop.is_set():
                self._flush_commits()
                limit = self.batch_size if self.max_records is None else min(self.batch_size, self.max_records - polled)
                if limit <= 0 or self.source.exhausted:
                    self._put(_END)
                    break
                poll = self.source.poll(self.timeout_s, limit)
                if len(poll):
                    polled += len(poll)
                    self._put(poll)
        except Exception as err:  # handed to the caller's next poll
            self._put(_Failure(err))
        finally:
            with self._lock:
                self._flush_commits()
                self._running = False

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return
            except queue.Full:
                self._flush_commits()

    def _flush_commits(self) -> None:
        # Called on the background thread while it runs, else after it stopped: one caller at a time.
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            return
        while self._commits:
            self.source.commit(self._commits.pop(0))


def _split(poll: Poll, n: int) -> tuple[Poll, Poll | None]:
    """The first ``n`` items of ``poll`` by position, and the rest (None when nothing is left)."""
    if len(poll) <= n:
        return poll, None
    items = [(r.position, True, r) for r in poll.records] + [(d.message.position, False, d) for d in poll.dead_letters]
    items.sort(key=lambda item: (item[0].stream, item[0].partition, item[0].offset, item[0].index))
    head, rest = Poll(), Poll()
    for i, (_, good, item) in enumerate(items):
        target = head if i < n else rest
        (target.records if good else target.dead_letters).append(item)
    return head, rest
