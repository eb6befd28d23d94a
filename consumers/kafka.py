"""A :class:`~consumers.source.Source` over a Kafka topic, in a consumer group, at-least-once.

Threading (why it looks like this)
----------------------------------
kafka-python's ``KafkaConsumer`` is not thread-safe, and in 3.x its rebalance callbacks run on its
own IO thread, where a blocking consumer call (``commit``) raises. So:

* one background *fetch thread* owns every consumer call: it polls, decodes each message
  (:func:`consumers.wire.decode`) and appends the results to a bounded buffer;
* the learner thread's :meth:`KafkaSource.poll` only takes from that buffer, so the learner never waits on the
  network while data is there, and :meth:`KafkaSource.commit` only hands offsets to the fetch thread, which
  commits them (the learner never waits on a broker round trip);
* the rebalance listener (kafka-python's IO thread) only touches the buffer and the offset maps under a lock,
  and commits with ``await commit_async``.

Backpressure: the buffer holds at most about ``prefetch`` records; when it is full the fetch thread pauses every
assigned partition (it keeps polling, so heartbeats and rebalances go on) and resumes once the learner has
taken half of them, so that fetches come in large chunks rather than one learner batch at a time.

Commits are coalesced: a learner that commits every batch would otherwise cost a broker round trip (and
kafka-python's request machinery, heavy Python) per batch. The fetch thread sends the newest pending offsets
at most once per ``commit_interval_s``, and at once on ``close()`` and on revoke, so a crash re-delivers at
most about ``commit_interval_s`` more of learned records (still at-least-once; Kafka's own auto-commit
default is 5 s).

Rebalances: on revoke, records fetched but not yet handed to the learner are dropped (the next owner reads
them from the committed offset), the listener waits (at most ``revoke_timeout_s``) until the learner has
committed what it holds, then commits it; on lost, everything for those partitions is dropped, uncommitted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import IllegalStateError, KafkaError
from kafka.structs import OffsetAndMetadata

from consumers.record import DeadLetter, Message, Poll, Position, Record
from consumers.source import Offsets
from consumers.wire import MAX_PAYLOAD_BYTES, decode

log = logging.getLogger("consumers.kafka")

Key = tuple[str, int]
_LAG_EVERY_S = 0.5


class KafkaSourceError(RuntimeError):
    """The background fetch thread failed; raised by the next :meth:`KafkaSource.poll`."""


class KafkaSource:
    """Records of one Kafka topic, consumed in group ``group``; offsets are committed only on request.

    Parameters
    ----------
    bootstrap, topic, group
        Broker address (``HOST:PORT``), topic to subscribe to, consumer group id.
    start_offsets
        ``{(topic, partition): next offset}`` to seek to when a partition is first assigned, overriding the
        group's committed offset (the service restores these from a checkpoint, so the model and the offsets
        agree). Used once per partition: after a later rebalance, the committed offset wins again.
    prefetch
        Decoded records held ahead of the learner before fetching pauses (bounded memory, backpressure).
    max_poll_records
        Most records one background fetch returns.
    fetch_timeout_s
        How long one background fetch waits for data.
    session_timeout_ms, heartbeat_interval_ms, max_poll_interval_ms
        Group-membership timings, passed to kafka-python. tansu holds a group's first join for
        ``session_timeout_ms / 2``, so tests use small values (e.g. 2000/500).
    revoke_timeout_s
        Longest wait, on revoke, for the learner to finish and commit the batch it holds.
    commit_interval_s
        Least time between two commits sent to the broker (0: every learner commit, on the fetch thread's
        next turn); pending offsets are always sent on ``close()`` and on revoke.
    max_bytes
        Messages larger than this become ``oversized`` dead letters.

    Notes
    -----
    ``commit(offsets)`` takes the offsets of learned records (last + 1, see
    :func:`consumers.source.next_offsets`); they reach the broker within about ``commit_interval_s`` and
    always before ``close()`` returns. ``committed`` holds what the broker has acknowledged. Leaving a
    ``with`` block on an exception closes without committing what is still pending.
    """

    exhausted = False

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        *,
        start_offsets: Offsets | None = None,
        prefetch: int = 2000,
        max_poll_records: int = 500,
        fetch_timeout_s: float = 0.1,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 3000,
        max_poll_interval_ms: int = 300000,
        revoke_timeout_s: float = 5.0,
        commit_interval_s: float = 0.5,
        auto_offset_reset: str = "earliest",
        max_bytes: int = MAX_PAYLOAD_BYTES,
        client_id: str = "stream-cl",
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (("prefetch", prefetch), ("max_poll_records", max_poll_records), ("max_bytes", max_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if fetch_timeout_s <= 0 or revoke_timeout_s < 0 or commit_interval_s < 0:
            raise ValueError("fetch_timeout_s must be > 0, revoke_timeout_s and commit_interval_s >= 0")
        if not 0 < heartbeat_interval_ms < session_timeout_ms:
            raise ValueError(f"need 0 < heartbeat_interval_ms < session_timeout_ms, got {heartbeat_interval_ms}")
        self.topic, self.group = topic, group
        self.committed: dict[Key, int] = {}
        self._start = dict(start_offsets or {})
        self._prefetch, self._max_poll_records = prefetch, max_poll_records
        self._fetch_timeout_s, self._revoke_timeout_s, self._max_bytes = fetch_timeout_s, revoke_timeout_s, max_bytes
        self._commit_interval_s = commit_interval_s
        self._commit_due = 0.0  # monotonic time from which the fetch thread may send pending offsets
        self._revoking = 0  # rebalance listeners waiting for the learner's commit
        self._cond = threading.Condition()
        self._buffer: deque[Record | DeadLetter] = deque()
        self._buffered: Counter[Key] = Counter()
        self._assigned: set[Key] = set()
        self._delivered: dict[Key, int] = {}
        self._pending: dict[Key, int] = {}
        self._lag: dict[Key, int] = {}
        self._rewind: dict[Key, int] = {}
        self._decode_seconds: deque[float] = deque(maxlen=10000)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._flush_on_close = True
        self._closed = False
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=group,
                client_id=client_id,
                enable_auto_commit=False,
                auto_offset_reset=auto_offset_reset,
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=heartbeat_interval_ms,
                max_poll_interval_ms=max_poll_interval_ms,
                **dict(client_options or {}),
            )
        except KafkaError as err:
            raise ConnectionError(f"cannot reach Kafka at {bootstrap}: {err}") from err
        self._consumer.subscribe(topics=[topic], listener=_Rebalance(self))
        self._thread = threading.Thread(target=self._fetch_loop, name=f"kafka-source-{topic}", daemon=True)
        self._thread.start()

    # --- learner thread -------------------------------------------------------------------------------

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> Poll:
        """Up to ``max_records`` decoded records and dead letters; waits at most ``timeout_s`` for the first."""
        with self._cond:
            self._cond.wait_for(lambda: self._buffer or self._error is not None or self._stop.is_set(), timeout_s)
            if self._error is not None:
                raise KafkaSourceError(f"Kafka fetch thread failed: {self._error}") from self._error
            taken = [self._buffer.popleft() for _ in range(min(max_records, len(self._buffer)))]
            for entry in taken:
                pos = _position(entry)
                key = (pos.stream, pos.partition)
                self._buffered[key] -= 1
                self._delivered[key] = pos.offset + 1
            if len(self._buffer) <= self._prefetch // 2:  # else a paused fetch thread stays asleep
                self._cond.notify_all()
        poll = Poll()
        for entry in taken:
            (poll.records if isinstance(entry, Record) else poll.dead_letters).append(entry)  # type: ignore[arg-type]
        return poll

    def commit(self, offsets: Offsets) -> None:
        """Commit ``offsets`` (next offset per partition) soon, on the fetch thread; never blocks on the broker.

        Offsets of partitions this consumer no longer owns are ignored: their next owner re-reads from the last
        committed offset (at-least-once).
        """
        with self._cond:
            for key, offset in offsets.items():
                if key in self._assigned and offset > max(self._pending.get(key, -1), self.committed.get(key, -1)):
                    self._pending[key] = offset
            if self._revoking or time.monotonic() >= self._commit_due:  # a wake-up per batch costs CPU
                self._cond.notify_all()

    def lag(self) -> dict[Key, int]:
        """Records behind each assigned partition's high watermark that the learner has not received yet."""
        with self._cond:
            return dict(self._lag)

    def take_decode_seconds(self) -> list[float]:
        """Decode wall times (one per fetched batch) since the last call."""
        with self._cond:
            out = list(self._decode_seconds)
            self._decode_seconds.clear()
        return out

    def assignment(self) -> set[Key]:
        """Partitions this consumer owns now."""
        with self._cond:
            return set(self._assigned)

    def close(self) -> None:
        """Commit what is pending, leave the group and stop the fetch thread (idempotent)."""
        self._shutdown(flush=True)

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._shutdown(flush=exc_type is None)

    def _shutdown(self, flush: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush_on_close = flush
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(timeout=60)

    # --- fetch thread ---------------------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        consumer = self._consumer
        last_lag = 0.0
        full = False
        try:
            while not self._stop.is_set():
                if time.monotonic() >= self._commit_due:
                    self._commit_pending()
                if time.monotonic() - last_lag >= _LAG_EVERY_S:
                    self._update_lag()
                    last_lag = time.monotonic()
                space = self._prefetch - len(self._buffer)
                full = space <= 0 or (full and len(self._buffer) > self._prefetch // 2)
                if full:
                    _guarded(consumer.pause, consumer.assignment())
                    # keeps group membership and rebalances going; a partition assigned since the pause may still
                    # return records, whose positions kafka-python has advanced, so they are kept
                    fetched = consumer.poll(timeout_ms=10, max_records=self._max_poll_records)
                    if fetched:
                        self._append(fetched)
                    with self._cond:
                        due = self._commit_due - time.monotonic() if self._pending else self._fetch_timeout_s
                        self._cond.wait_for(self._fetch_wanted, min(self._fetch_timeout_s, max(0.0, due)))
                    continue
                if consumer.paused():
                    _guarded(consumer.resume, consumer.paused())
                fetched = consumer.poll(
                    timeout_ms=int(self._fetch_timeout_s * 1000), max_records=min(space, self._max_poll_records)
                )
                if fetched:
                    self._append(fetched)
                    last_lag = 0.0  # fresh high watermarks: report the lag now (overload policies act on it)
        except Exception as err:  # surfaced to the learner by its next poll()
            log.exception("Kafka fetch thread failed")
            with self._cond:
                self._error = err
                self._cond.notify_all()
        finally:
            if self._flush_on_close and self._error is None:
                self._commit_pending()
            consumer.close(autocommit=False)

    def _fetch_wanted(self) -> bool:
        """While paused: wake when the buffer is down to its low watermark, a commit is due, or on close."""
        commit_due = bool(self._pending) and time.monotonic() >= self._commit_due
        return len(self._buffer) <= self._prefetch // 2 or commit_due or self._stop.is_set()

    def _append(self, fetched: dict) -> None:
        started = time.perf_counter()
        entries = [decode(message_from_record(r), self._max_bytes) for records in fetched.values() for r in records]
        elapsed = time.perf_counter() - started
        with self._cond:
            self._decode_seconds.append(elapsed)
            self._buffer.extend(entries)
            for tp, records in fetched.items():
                self._buffered[(tp.topic, tp.partition)] += len(records)
            revoked = {(tp.topic, tp.partition) for tp in fetched} - self._assigned
            if revoked:  # revoked while this batch was decoded
                self._drop(revoked)
            self._cond.notify_all()

    def _commit_pending(self) -> None:
        with self._cond:
            offsets, self._pending = self._pending, {}
            if offsets:
                self._commit_due = time.monotonic() + self._commit_interval_s
        if not offsets:
            return
        try:
            self._consumer.commit(_kafka_offsets(offsets))
        except KafkaError as err:
            log.warning("commit of %s failed (%s); those records will be delivered again", offsets, err)
            return
        with self._cond:
            self.committed.update(offsets)
            self._cond.notify_all()

    def _update_lag(self) -> None:
        lag = {}
        for tp in self._consumer.assignment():
            try:
                high = self._consumer.highwater(tp)
                position = self._consumer.position(tp, timeout_ms=100) if high is not None else None
            except (IllegalStateError, KafkaError):
                continue  # reassigned meanwhile
            if high is not None and position is not None:
                lag[(tp.topic, tp.partition)] = max(0, high - position) + self._buffered[(tp.topic, tp.partition)]
        with self._cond:
            self._lag = lag

    # --- rebalance listener (kafka-python's IO thread) ------------------------------------------------

    def _revoke(self, keys: set[Key]) -> dict[Key, int]:
        """Drop undelivered records of ``keys``, wait for the learner's commit, return what to commit."""
        with self._cond:
            self._drop(keys)
            if self._stop.is_set() and not self._flush_on_close:
                return {}
            held = {k for k in keys if k in self._delivered}

            def settled() -> bool:
                done = (max(self._pending.get(k, -1), self.committed.get(k, -1)) >= self._delivered[k] for k in held)
                return self._stop.is_set() or all(done)

            self._revoking += 1
            try:
                waited = self._cond.wait_for(settled, self._revoke_timeout_s)
            finally:
                self._revoking -= 1
            if not waited:
                log.warning("revoked %s before the learner committed them; records will be delivered again", held)
            return {k: self._pending.pop(k) for k in list(self._pending) if k in keys}

    def _forget(self, keys: set[Key], offsets: dict[Key, int]) -> None:
        with self._cond:
            self.committed.update(offsets)
            self._drop(keys)
            for key in keys:
                self._assigned.discard(key)
                for table in (self._delivered, self._pending, self._lag, self._buffered):
                    table.pop(key, None)

    def _assign(self, partitions: Iterable[TopicPartition]) -> None:
        with self._cond:
            rewind, self._rewind = self._rewind, {}
            self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            offset = self._start.pop(key, None)
            if offset is None:
                offset = rewind.get(key)
            if offset is not None:
                self._consumer.seek(tp, offset)

    def _drop(self, keys: set[Key]) -> None:
        """Forget undelivered records of ``keys`` and remember where they began.

        kafka-python keeps its fetch position for a partition that is assigned again after an eager rebalance,
        so without a seek back to the first dropped record (done on the next assignment) those records would
        be skipped.
        """
        kept: deque[Record | DeadLetter] = deque()
        for entry in self._buffer:
            pos = _position(entry)
            key = (pos.stream, pos.partition)
            if key in keys:
                self._rewind[key] = min(self._rewind.get(key, pos.offset), pos.offset)
            else:
                kept.append(entry)
        self._buffer = kept
        for key in keys:
            self._buffered.pop(key, None)


class _Rebalance(AsyncConsumerRebalanceListener):
    """Async so the revoke-time commit can be awaited on kafka-python's IO loop (a blocking commit raises there)."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        keys = _keys(revoked)
        offsets = self._source._revoke(keys)
        if offsets:
            try:
                await self._source._consumer.commit_async(_kafka_offsets(offsets))
            except KafkaError as err:
                log.warning("commit on revoke failed (%s); records will be delivered again", err)
                offsets = {}
        self._source._forget(keys, offsets)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._assign(assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._source._forget(_keys(lost), {})


def _keys(partitions: Iterable[TopicPartition]) -> set[Key]:
    return {(tp.topic, tp.partition) for tp in partitions}


def _kafka_offsets(offsets: dict[Key, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


def _guarded(method, partitions: Iterable[TopicPartition]) -> None:
    """pause/resume, tolerating a partition that a rebalance took away meanwhile."""
    with contextlib.suppress(KeyError, IllegalStateError):
        method(*partitions)


def _position(entry: Record | DeadLetter) -> Position:
    return entry.position if isinstance(entry, Record) else entry.message.position


def message_from_record(r) -> Message:
    """A kafka-python ``ConsumerRecord`` as a :class:`Message` (timestamp in seconds; a null value as b"")."""
    headers = tuple((k, v if v is not None else b"") for k, v in (r.headers or ()))
    return Message(Position(r.topic, r.partition, r.offset), r.timestamp / 1000.0, r.key, r.value or b"", headers)
