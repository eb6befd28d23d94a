"""A :class:`~consumers.source.Source` over a Kafka topic, in a consumer group, at-least-once.

Threading (why it looks like this)
----------------------------------
kafka-python's ``KafkaConsumer`` is not thread-safe, and in 3.x its rebalance callbacks run on its
own IO thread, where a blocking consumer call (``commit``) raises. So:

* one background *fetch thread* owns every consumer call: it polls, decodes each message into its samples
  (:func:`consumers.wire.decode_samples`) and appends the results to a bounded buffer;
* the learner thread's :meth:`KafkaSource.poll` only takes from that buffer, so the learner never waits on the
  network while data is there, and :meth:`KafkaSource.commit` only hands offsets to the fetch thread, which
  commits them (the learner never waits on a broker round trip);
* the rebalance listener (kafka-python's IO thread) only touches the buffer and the offset maps under a lock,
  and commits with ``await commit_async``; it waits for the learner's commit by sleeping on that thread's event
  loop, never blocking it: the loop also sends the heartbeats, and a member silent for ``session_timeout_ms`` is
  evicted from the group.

Backpressure: the buffer holds at most about ``prefetch`` records and ``prefetch_bytes`` bytes (decoded arrays and
the raw messages kept for dead letters; one fetch may go past it); when it is full the fetch thread pauses every
assigned partition (it keeps polling, so heartbeats and rebalances go on) and resumes once the learner has
taken half of it, so that fetches come in large chunks rather than one learner batch at a time. The byte bound
is what keeps a topic of large messages (up to ``max_bytes`` each) from taking gigabytes.

Commits are coalesced: a learner that commits every batch would otherwise cost a broker round trip (and
kafka-python's request machinery, heavy Python) per batch. The fetch thread sends the newest pending offsets
at most once per ``commit_interval_s``, and at once on ``close()`` and on revoke, so a crash re-delivers at
most about ``commit_interval_s`` more of learned records (still at-least-once; Kafka's own auto-commit
default is 5 s).

Lag (:meth:`KafkaSource.lag`) covers every assigned partition: the broker's end offset minus the next offset the
learner will get (records fetched and decoded here but not yet handed over still count). The fetch thread
refreshes the end offsets every ``_LAG_EVERY_S`` even when nothing arrives, so an idle, caught-up stream reports 0.
The end offset is the larger of ListOffsets(LATEST) and the high watermark of the last fetch response: some brokers
(tansu's memory storage) answer ListOffsets with a stale, lower offset, while a partition not fetched yet has no
high watermark at all; neither ever overstates the end.

The fetch thread survives bad input and transient errors: a record whose decoding raises becomes an ``internal``
dead letter, and any other error is logged and retried after a short back-off.

A record kafka-python cannot read (its record reader raises: ``CorruptRecordError`` for a batch failing its CRC, a
header key that is not UTF-8 or broken framing; any other error there too, such as a compression codec that is not
installed) becomes an ``undecodable`` dead letter at its offset (key and value empty: they were never read), and
the partition is moved past it with a seek. Without the seek, kafka-python would ask its dead reader for records
forever: a fetch thread at 100 % CPU, no fetches, commits or lag, again after every restart. kafka-python reads a
batch from its start and cannot get past a bad record in it, so in a batch that passed its CRC check every offset
from the first not handed over to the batch's last is dead-lettered at once (at most ``max_poll_records`` per
fetch; in a compacted partition some of them may no longer exist). A batch that failed its CRC check says nothing
trustworthy about where it ends: its offsets are dead-lettered one per fetch until the broker's answers move past it.

Messages of several samples (wire format 2): the learner's commit of a message's offset comes only once all its
samples are processed (:func:`consumers.source.next_offsets`); ``start_offsets`` given as
:class:`~consumers.source.NextOffsets` (a checkpoint's) skip the samples of a partly learned message that its
``within`` counts, once, at the seek. The group's committed offset carries that count too, in the commit's
metadata (:func:`within_metadata`, ``"streamcl:within=N"``), so a partition that a rebalance or a restart hands to
a consumer without a checkpoint also resumes at the sample; metadata in any other form counts as 0.

Rebalances: on revoke, records fetched but not yet handed to the learner are dropped (the next owner reads
them from the committed offset), the listener waits (at most ``revoke_timeout_s``) until the learner has
committed what it holds, then commits it; on lost, everything for those partitions is dropped, uncommitted.

Several consumers of one model (``serve --workers``) resume from one checkpoint, and each would seek a partition
to the checkpoint's offset when it first gets it, even after another worker of the same run learned past that
offset and a rebalance handed the partition over: those records would be learned twice. So such consumers share
:class:`RunOffsets`: every commit of the learner is put there before it is sent (the records are learned whatever
the broker answers: a commit refused because a rebalance evicted the member does not make them unlearned), and a
partition assigned to a consumer of the run starts where the run's learners got (the checkpoint's offset only
for its first owner in the run; the group's committed offset only where the run holds nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import FrameType
from typing import Any, NamedTuple, Protocol

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import IllegalStateError, KafkaError
from kafka.record.default_records import DefaultRecordBatch
from kafka.structs import OffsetAndMetadata

from consumers.record import DeadLetter, Message, Poll, Position, Record, held_bytes
from consumers.source import Offsets, within_of
from consumers.wire import MAX_PAYLOAD_BYTES, MAX_SAMPLES, decode_samples

log = logging.getLogger("consumers.kafka")

Key = tuple[str, int]
_LAG_EVERY_S = 1.0
_OFFSETS_TIMEOUT_MS = 500  # a ListOffsets lookup for the lag must not stall fetching for long
# a partition past its end (rare) is worth a longer wait: librdkafka's lookups on a busy broker took over 500 ms
_PAST_END_OFFSETS_TIMEOUT_MS = 5000
_FIRST_FETCH_RECORDS = 16  # asked of the first fetch, before the size of a message is known
_BACKOFF_S = (0.1, 5.0)  # first and longest wait before the fetch thread retries after an error
_REVOKE_LOOK_S = 0.05  # how often a revoke waiting for the learner looks whether it has committed
_PAST_END_S = 30.0
"""How long a partition must stay positioned past its end, fetching nothing, before it is read again from its
beginning: a new leader's or a follower's high watermark may lag for seconds, a recreated topic's stays behind."""
_WITHIN_PREFIX = "streamcl:within="
_WITHIN = re.compile(re.escape(_WITHIN_PREFIX) + r"([1-9][0-9]{0,3})")


class RunOffsets(Protocol):
    """Where the consumers of one run of a model (the workers of ``serve --workers``) committed each partition.

    Shared among them, and new with every run (a restart resumes from the checkpoint, so it must not see the
    offsets of the run before it).
    """

    def get(self, key: Key) -> tuple[int, int] | None:
        """``(offset, within)`` the run's learners got to in partition ``key``, or None if it has none."""

    def put(self, key: Key, offset: int, within: int) -> None:
        """Record that the learner learned partition ``key`` up to ``(offset, within)`` (the commit it asked for)."""


DEFAULT_PREFETCH_BYTES = 256 * 1024 * 1024


def within_metadata(within: int) -> str:
    """Commit metadata saying ``within`` samples of the message at the committed offset are done ("" for none).

    >>> within_metadata(3), within_metadata(0)
    ('streamcl:within=3', '')
    """
    return f"{_WITHIN_PREFIX}{within}" if within > 0 else ""


def within_from_metadata(metadata: object) -> int | None:
    """The count :func:`within_metadata` wrote; 0 for no metadata, None for metadata in any other form.

    >>> within_from_metadata("streamcl:within=3"), within_from_metadata(None), within_from_metadata("x=1")
    (3, 0, None)
    """
    if metadata is None or metadata == "":
        return 0
    match = _WITHIN.fullmatch(metadata) if isinstance(metadata, str) else None
    if match is None or int(match[1]) >= MAX_SAMPLES:  # a message never holds more samples than that
        return None
    return int(match[1])


class UnreadableRecord(NamedTuple):
    """A record the Kafka client cannot hand over whole, with the fields :func:`message_from_record` reads:
    :class:`KafkaSource` makes it an ``undecodable`` dead letter at its offset, saying ``detail``."""

    topic: str
    partition: int
    offset: int
    detail: str
    timestamp: int = -1  # milliseconds; Kafka's "none" where the client could not read it
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple = ()


class TopicNotFoundError(ValueError):
    """The topic named by the source does not exist on the broker (and the source was told to require it)."""

    def __init__(self, topic: str, bootstrap: str) -> None:
        super().__init__(f"topic {topic!r} does not exist on {bootstrap}")
        self.topic, self.bootstrap = topic, bootstrap


class KafkaSource:
    """Records of one Kafka topic, consumed in group ``group``; offsets are committed only on request.

    Parameters
    ----------
    bootstrap, topic, group
        Broker address (``HOST:PORT``), topic to subscribe to, consumer group id.
    start_offsets
        ``{(topic, partition): next offset}`` to seek to when a partition is first assigned, overriding the
        group's committed offset. Used once per partition: after a later rebalance, the committed offset wins again.
    from_checkpoint
        ``start_offsets`` come from a model checkpoint and decide where *every* partition starts: one they hold no
        offset for has taught the model nothing, so it starts at its earliest offset. Once a partition is first
        assigned, its start offset is committed (where the group holds an offset for it), so the group agrees
        with the model.
    require_topic
        Raise :class:`TopicNotFoundError` at once if the topic does not exist, instead of waiting for it (some
        brokers, tansu among them, create a subscribed topic on the fly, which hides a mistyped name).
    prefetch, prefetch_bytes
        Decoded records, and their bytes, held ahead of the learner before fetching pauses (bounded memory,
        backpressure).
    max_poll_records
        Most records one background fetch returns.
    fetch_timeout_s
        How long one background fetch waits for data.
    session_timeout_ms, heartbeat_interval_ms, max_poll_interval_ms
        Group-membership timings, passed to kafka-python. tansu holds a group's first join for
        ``session_timeout_ms / 2``, so tests use small values (e.g. 2000/500).
    revoke_timeout_s
        Longest wait, on revoke, for the learner to finish and commit the batch it holds (None: as long as the
        group waits for a member to rejoin, ``max_poll_interval_ms``). The learner learns what it holds either
        way and the next owner reads anything uncommitted again, so a shorter wait turns a slow step during a
        rebalance into records learned twice.
    commit_interval_s
        Least time between two commits sent to the broker (0: every learner commit, on the fetch thread's
        next turn); pending offsets are always sent on ``close()`` and on revoke.
    max_bytes
        Messages larger than this become ``oversized`` dead letters.
    decoder
        Turns a message into a record or a dead letter (or a list of them, one per sample), never raising:
        the wire format (None, :func:`consumers.wire.decode_samples`), :func:`consumers.label_wire.decode_label`
        for a topic of label messages.
    client_options
        Further kafka-python client settings (``security_protocol``, ``sasl_*``, ``ssl_*``, ...).
    consumer_class
        The client: kafka-python's ``KafkaConsumer``, or a class with the same interface and keyword settings
        (:class:`consumers.kafka_librdkafka.LibrdkafkaConsumer`, librdkafka underneath).
    run_offsets
        Shared with the other consumers of this run of the model (see the module docstring): a partition assigned
        here that the run's learners learned from starts where they got, not at ``start_offsets`` or the group's
        committed offset.

    Notes
    -----
    ``commit(offsets)`` takes the offsets of learned records (last + 1, see
    :func:`consumers.source.next_offsets`); they reach the broker within about ``commit_interval_s`` and
    always before ``close()`` returns. ``committed`` holds what the broker has acknowledged. Leaving a
    ``with`` block on an exception closes without committing what is still pending.
    """

    exhausted = False
    poll_timeout_s = 0.5
    fetches_ahead = True

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        *,
        start_offsets: Offsets | None = None,
        from_checkpoint: bool = False,
        require_topic: bool = False,
        prefetch: int = 2000,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
        max_poll_records: int = 500,
        fetch_timeout_s: float = 0.1,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 3000,
        max_poll_interval_ms: int = 300000,
        revoke_timeout_s: float | None = None,
        commit_interval_s: float = 0.5,
        auto_offset_reset: str = "earliest",
        max_bytes: int = MAX_PAYLOAD_BYTES,
        client_id: str = "stream-cl",
        client_options: Mapping[str, Any] | None = None,
        decoder: Callable[[Message, int], Any] | None = None,
        consumer_class: Callable[..., Any] = KafkaConsumer,
        run_offsets: RunOffsets | None = None,
    ) -> None:
        positive = {"prefetch": prefetch, "prefetch_bytes": prefetch_bytes, "max_poll_records": max_poll_records}
        for name, value in {**positive, "max_bytes": max_bytes}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if revoke_timeout_s is None:
            revoke_timeout_s = max_poll_interval_ms / 1000
        if fetch_timeout_s <= 0 or revoke_timeout_s < 0 or commit_interval_s < 0:
            raise ValueError("fetch_timeout_s must be > 0, revoke_timeout_s and commit_interval_s >= 0")
        if not 0 < heartbeat_interval_ms < session_timeout_ms:
            raise ValueError(f"need 0 < heartbeat_interval_ms < session_timeout_ms, got {heartbeat_interval_ms}")
        self.topic, self.group = topic, group
        self.committed: dict[Key, int] = {}
        self.assigned_at: float | None = None
        self._start = dict(start_offsets or {})
        self._from_checkpoint = from_checkpoint
        self._run_offsets = run_offsets
        self._shared: dict[Key, tuple[int, int]] = {}  # (offset, within) last put in run_offsets, per partition
        self._share_lock = threading.Lock()
        self._placed: set[Key] = set()  # partitions whose start has been decided (first assignment)
        # (offset, within) to commit per newly placed partition; offset None: the partition's earliest offset
        self._start_commits: dict[Key, tuple[int | None, int]] = {}
        self._prefetch, self._prefetch_bytes, self._max_poll_records = prefetch, prefetch_bytes, max_poll_records
        self.buffered_bytes = 0
        """Bytes the records and dead letters fetched ahead of the learner hold (``consumers.record.held_bytes``)."""
        self._message_bytes: int | None = None  # held bytes per message in the last fetch
        self._fetch_timeout_s, self._revoke_timeout_s, self._max_bytes = fetch_timeout_s, revoke_timeout_s, max_bytes
        self._commit_interval_s = commit_interval_s
        self._decoder = decoder if decoder is not None else decode_samples
        self._start_within = within_of(start_offsets or {})
        # (offset, samples) per partition: the first samples of the message at that offset not to hand over again
        self._skip: dict[Key, tuple[int, int]] = {}
        self._expect: dict[Key, int] = {}  # offset the next record fetched of a partition must carry, where known
        self._skipped_offsets: Counter[str] = Counter()  # records never fetched, by reason (see skipped_offsets)
        self._gaps: dict[Key, list[tuple[int, int]]] = {}  # (expected, first) forward jumps the lag refresh checks
        self._past_end_since: dict[Key, float] = {}  # when a partition was first seen past its end, fetching nothing
        self._partial: dict[Key, tuple[int, int]] = {}  # the same for a message handed over in part
        self._commit_due = 0.0  # monotonic time from which the fetch thread may send pending offsets
        self._cond = threading.Condition()
        self._buffer: deque[Record | DeadLetter] = deque()
        self._buffered: Counter[Key] = Counter()
        self._assigned: set[Key] = set()
        self._delivered: dict[Key, int] = {}
        self._pending: dict[Key, int] = {}
        self._pending_within: dict[Key, int] = {}  # samples done of the message at the pending offset (if any)
        self._committed_within: dict[Key, int] = {}
        self._group_within: set[Key] = set()  # assigned at the group's offset: its commit metadata still to read
        self._bad_metadata_logged = False
        self._ends: dict[Key, int] = {}  # broker end offset per partition, refreshed by the fetch thread
        self._positions: dict[Key, int] = {}  # next offset the fetch thread will fetch
        self._rewind: dict[Key, tuple[int, int]] = {}  # where to seek on reassignment, and samples to skip there
        self._decode_seconds: deque[float] = deque(maxlen=10000)
        self._lag_due = 0.0  # monotonic time of the next end-offset refresh
        self._full = False  # the buffer reached ``prefetch``: fetching paused until it is half empty
        self._stop = threading.Event()
        self._flush_on_close = True
        self._closed = False
        try:
            self._consumer = consumer_class(
                bootstrap_servers=bootstrap,
                group_id=group,
                client_id=client_id,
                enable_auto_commit=False,
                auto_offset_reset=auto_offset_reset,
                # records of aborted or still open transactions are not data (librdkafka's default too)
                isolation_level="read_committed",
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=heartbeat_interval_ms,
                max_poll_interval_ms=max_poll_interval_ms,
                **dict(client_options or {}),
            )
        except KafkaError as err:
            raise ConnectionError(f"cannot reach Kafka at {bootstrap}: {err}") from err
        if require_topic:
            self._require_topic(bootstrap)
        self._consumer.subscribe(topics=[topic], listener=_Rebalance(self))
        self._thread = threading.Thread(target=self._fetch_loop, name=f"kafka-source-{topic}", daemon=True)
        self._thread.start()

    # --- learner thread -------------------------------------------------------------------------------

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> Poll:
        """Up to ``max_records`` decoded records and dead letters; waits at most ``timeout_s`` for the first."""
        with self._cond:
            self._cond.wait_for(lambda: self._buffer or self._stop.is_set(), timeout_s)
            taken = [self._buffer.popleft() for _ in range(min(max_records, len(self._buffer)))]
            self.buffered_bytes -= sum(map(held_bytes, taken))
            for entry in taken:
                pos = _position(entry)
                key = (pos.stream, pos.partition)
                if pos.ends_message:
                    self._buffered[key] -= 1
                    self._delivered[key] = pos.offset + 1
                    self._partial.pop(key, None)
                else:
                    self._delivered[key] = pos.offset
                    self._partial[key] = (pos.offset, pos.index + 1)
            if self._low():  # else a paused fetch thread stays asleep
                self._cond.notify_all()
        poll = Poll()
        for entry in taken:
            (poll.dead_letters if isinstance(entry, DeadLetter) else poll.records).append(entry)  # type: ignore[arg-type]
        return poll

    def commit(self, offsets: Offsets) -> None:
        """Commit ``offsets`` (next offset per partition) soon, on the fetch thread; never blocks on the broker.

        Offsets of partitions this consumer no longer owns are ignored: their next owner re-reads from the last
        committed offset (at-least-once).
        """
        within = within_of(offsets)
        with self._cond:
            for key, offset in offsets.items():
                if key in self._assigned and (offset, within.get(key, 0)) > self._learned(key):
                    self._pending[key] = offset
                    self._pending_within[key] = within.get(key, 0)
            if time.monotonic() >= self._commit_due:  # a wake-up per batch costs CPU
                self._cond.notify_all()

    def _learned(self, key: Key) -> tuple[int, int]:
        """(offset, within) of the newest commit pending or done for ``key`` ((-1, 0): none).

        One beyond what this assignment delivered counts as none: it is stale (the partition's offsets went back,
        see :meth:`_note_reset`) and must not refuse the commits of the records delivered now.
        """
        done = max(
            (self._pending.get(key, -1), self._pending_within.get(key, 0)),
            (self.committed.get(key, -1), self._committed_within.get(key, 0)),
        )
        delivered = self._delivered.get(key)
        return done if delivered is None or done[0] <= delivered else (-1, 0)

    def skipped_offsets(self) -> dict[str, int]:
        """Records never fetched since the start, by reason: ``out_of_range``, records deleted (retention) before
        they were read, which the client skipped, moving to the partition's earliest offset."""
        with self._cond:
            return dict(self._skipped_offsets)

    def lag(self) -> dict[Key, int]:
        """Records not yet handed to the learner, per assigned partition: end offset - next offset it will get.

        A partition appears once its end offset and position are known (within about a second of assignment).
        """
        with self._cond:
            return {
                key: max(0, self._ends[key] - (self._positions[key] - self._buffered[key]))
                for key in self._assigned
                if key in self._ends and key in self._positions
            }

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

    def _require_topic(self, bootstrap: str) -> None:
        # A metadata request for all topics lists them without creating any (subscribing may create one).
        try:
            exists = self.topic in self._consumer.topics()
        except KafkaError as err:
            self._consumer.close(autocommit=False)
            raise ConnectionError(f"cannot list the topics of Kafka at {bootstrap}: {err}") from err
        if not exists:
            self._consumer.close(autocommit=False)
            raise TopicNotFoundError(self.topic, bootstrap)

    def _fetch_loop(self) -> None:
        backoff = _BACKOFF_S[0]
        try:
            while not self._stop.is_set():
                try:
                    self._fetch_once()
                    backoff = _BACKOFF_S[0]
                except Exception:  # one bad turn must not end the stream: log it, wait, try again
                    log.exception("Kafka fetch failed; retrying in %.1f s", backoff)
                    self._stop.wait(backoff)
                    backoff = min(2 * backoff, _BACKOFF_S[1])
        finally:
            if self._flush_on_close:
                with contextlib.suppress(Exception):  # best effort: uncommitted records are delivered again
                    self._commit_pending()
            with contextlib.suppress(Exception):
                self._consumer.close(autocommit=False)

    def _fetch_once(self) -> None:
        """One turn: commit what is due, refresh the lag, then fetch (or, while the buffer is full, keep alive)."""
        consumer = self._consumer
        self._read_group_within()
        self._commit_start_offsets()
        if time.monotonic() >= self._commit_due:
            self._commit_pending()
        if time.monotonic() >= self._lag_due:
            self._lag_due = time.monotonic() + _LAG_EVERY_S
            self._update_lag()
        space = self._prefetch - len(self._buffer)
        self._full = space <= 0 or self.buffered_bytes >= self._prefetch_bytes or (self._full and not self._low())
        if self._full:
            _guarded(consumer.pause, consumer.assignment())
            # keeps group membership and rebalances going; a partition assigned since the pause may still
            # return records, whose positions kafka-python has advanced, so they are kept
            fetched = self._poll(10, self._max_poll_records)
            if fetched:
                self._take_in(fetched)
            with self._cond:
                due = min(self._commit_due if self._pending else self._lag_due, self._lag_due) - time.monotonic()
                self._cond.wait_for(self._fetch_wanted, min(self._fetch_timeout_s, max(0.0, due)))
            return
        if consumer.paused():
            _guarded(consumer.resume, consumer.paused())
        fetched = self._poll(int(self._fetch_timeout_s * 1000), min(space, self._max_poll_records, self._bytes_room()))
        if fetched:
            self._take_in(fetched)

    def _poll(self, timeout_ms: int, max_records: int) -> dict:
        """``consumer.poll``; records kafka-python cannot read come back as :class:`UnreadableRecord`, and their
        partition is moved past them (see the module docstring)."""
        try:
            return self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except Exception as err:
            found = unreadable_records(err, self._max_poll_records)
            if found is None:  # not raised by kafka-python's record reader: logged and retried
                raise
            tp, records = found
            if tp not in self._consumer.assignment():  # revoked meanwhile: the next owner meets it
                return {}
            first, last = records[0].offset, records[-1].offset
            log.warning("%s: offsets %d-%d cannot be read (%s); they become dead letters", tp, first, last, err)
            self._consumer.seek(tp, last + 1)  # also drops the dead reader
            return {tp: records}

    def _fetch_wanted(self) -> bool:
        """While paused: wake when the buffer is down to its low watermark, a commit is due, or on close."""
        commit_due = bool(self._pending) and time.monotonic() >= self._commit_due
        return self._low() or commit_due or self._stop.is_set()

    def _bytes_room(self) -> int:
        """Records the byte bound has room for, at the last fetch's bytes per message (a few until that is known)."""
        if self._message_bytes is None:
            return _FIRST_FETCH_RECORDS
        return max(1, (self._prefetch_bytes - self.buffered_bytes) // max(1, self._message_bytes))

    def _low(self) -> bool:
        """Whether the buffer is down to its low watermark (half of both bounds), where a paused fetch resumes."""
        return len(self._buffer) <= self._prefetch // 2 and self.buffered_bytes <= self._prefetch_bytes // 2

    def _take_in(self, fetched: dict) -> None:
        """Buffer a fetch; if that fails, seek back to its first records so they are fetched again, not lost."""
        try:
            self._append(fetched)
        except Exception:
            for tp, records in fetched.items():
                with contextlib.suppress(IllegalStateError, KafkaError):  # no longer assigned: the next owner reads it
                    self._consumer.seek(tp, records[0].offset)
            raise

    def _append(self, fetched: dict) -> None:
        self._read_group_within()  # a partition assigned by this very poll: its skip must be known first
        started = time.perf_counter()
        entries = [
            entry
            for records in fetched.values()
            for r in records
            for entry in _decode(self._decoder, r, self._max_bytes)
        ]
        elapsed = time.perf_counter() - started
        highs = {tp: self._consumer.highwater(tp) for tp in fetched}
        jumps = self._jumps(fetched)
        with self._cond:  # nothing below raises: a failure above leaves the buffer untouched (see _take_in)
            self._decode_seconds.append(elapsed)
            for key, (expected, first) in jumps.items():
                if first < expected:
                    self._note_reset(key, expected, first)
                else:  # compaction, transaction markers, or records deleted unread: told apart once a second
                    self._gaps.setdefault(key, []).append((expected, first))
            if self._skip:
                entries = self._skipped(entries)
            self._buffer.extend(entries)
            added = sum(map(held_bytes, entries))
            self.buffered_bytes += added
            # halving the last estimate at most: a fetch of small or unreadable records must not let the next
            # one ask for max_poll_records large ones
            per_message = added // max(1, sum(map(len, fetched.values())))
            self._message_bytes = max(per_message, (self._message_bytes or 0) // 2)
            for tp, records in fetched.items():
                key = (tp.topic, tp.partition)
                self._buffered[key] += len(records)
                self._positions[key] = records[-1].offset + 1
                self._past_end_since.pop(key, None)
                if key in self._assigned:
                    self._expect[key] = records[-1].offset + 1
                if highs[tp] is not None:
                    self._ends[key] = max(highs[tp], self._ends.get(key, 0))
            revoked = {(tp.topic, tp.partition) for tp in fetched} - self._assigned
            if revoked:  # revoked while this batch was decoded
                self._drop(revoked)
            self._cond.notify_all()

    def _skipped(self, entries: list[Record | DeadLetter]) -> list[Record | DeadLetter]:
        """``entries`` without the samples already learned of a message partly learned before a seek back to it."""
        kept = []
        for entry in entries:
            pos = _position(entry)
            key = (pos.stream, pos.partition)
            skip = self._skip.get(key)
            if skip is not None and pos.offset >= skip[0]:
                if pos.offset == skip[0] and pos.index < skip[1]:
                    continue
                del self._skip[key]  # past those samples: nothing more to skip in this partition
            kept.append(entry)
        return kept

    def _read_group_within(self) -> None:
        """For partitions that start at the group's offset, skip the samples its commit metadata says are done
        (and expect the first record there, see :meth:`_jumps`)."""
        with self._cond:
            keys, self._group_within = self._group_within, set()
        for key in keys:
            try:
                answer = self._consumer.committed(TopicPartition(*key), metadata=True)
            except KafkaError as err:
                log.warning("committed offset of %s unavailable (%s); its message starts at sample 0", key, err)
                continue
            if answer is None or answer.offset is None or answer.offset < 0:
                continue
            with self._cond:
                if key in self._assigned:
                    self._expect[key] = answer.offset
            within = within_from_metadata(answer.metadata)
            if within is None:
                if not self._bad_metadata_logged:
                    self._bad_metadata_logged = True
                    log.warning("ignoring commit metadata %.80r of %s not written by stream-cl", answer.metadata, key)
                continue
            if within:
                with self._cond:
                    if key in self._assigned:
                        self._skip[key] = (answer.offset, within)

    def _jumps(self, fetched: dict) -> dict[Key, tuple[int, int]]:
        """``(expected, first)`` of each fetched partition whose first record is not where it was expected: the
        client moved it (both kafka-python and librdkafka answer an offset out of range by moving to the
        partition's earliest one, and say so only in a debug log), or, forward, compaction and transaction markers
        left a gap."""
        with self._cond:
            return {
                (tp.topic, tp.partition): (expected, records[0].offset)
                for tp, records in fetched.items()
                if (expected := self._expect.get((tp.topic, tp.partition), records[0].offset)) != records[0].offset
            }

    def _note_reset(self, key: Key, expected: int, first: int) -> None:
        """Partition ``key`` goes on at ``first``, below ``expected``: the offsets went back (a recreated or truncated
        topic). Forget what was learned of offsets that no longer exist, and commit ``first`` (a stale group offset
        would send the partition's next owner astray). Called holding ``_cond``."""
        topic, partition = key
        log.warning(
            "topic %s partition %d: offset %d is past the partition's end (the topic was recreated or truncated); "
            "starting again at its beginning, offset %d",
            *(topic, partition, expected, first),
        )
        for table in (self.committed, self._committed_within, self._pending, self._pending_within):
            table.pop(key, None)
        if key in self._skip and self._skip[key][0] != first:
            del self._skip[key]  # samples of a message at an offset that now holds another one, or none
        self._start_commits[key] = (first, 0)

    def _count_deleted(self) -> None:
        """Tell the forward jumps fetched since the last call apart (once a second, batched): a gap below the
        partition's beginning offset was records deleted (retention) before they were read, counted and logged;
        one above it is compaction or transaction markers (no call per fetch: those come with every transaction)."""
        with self._cond:
            gaps, self._gaps = self._gaps, {}
        if not gaps:
            return
        partitions = [TopicPartition(*key) for key in gaps]
        try:
            beginnings = self._consumer.beginning_offsets(partitions, timeout_ms=_OFFSETS_TIMEOUT_MS)
        except KafkaError as err:
            log.warning("cannot tell whether records of %s were deleted unread (%s)", sorted(gaps), err)
            return
        for tp, beginning in beginnings.items():
            for expected, first in gaps[(tp.topic, tp.partition)] if beginning is not None else ():
                deleted = min(first, beginning) - expected
                if deleted <= 0:
                    continue
                log.warning(
                    "topic %s partition %d: offsets %d-%d were deleted before they were read (retention); %d records "
                    "skipped, going on at offset %d",
                    *(tp.topic, tp.partition, expected, expected + deleted - 1, deleted, first),
                )
                with self._cond:
                    self._skipped_offsets["out_of_range"] += deleted

    def _restart_past_end(self, positions: dict[TopicPartition, int | None]) -> None:
        """Move partitions that stay positioned past their end back to their beginning.

        Brokers that answer a fetch there with no records instead of an out-of-range error (tansu) leave the client
        waiting for offsets that may never come, skipping every record up to them. The end is the high watermark
        of a fetch at that position (ListOffsets may understate it, see :meth:`_update_lag`), which a new leader or a
        follower may report lower for a while: only a partition past it for :data:`_PAST_END_S`, fetching nothing,
        is moved. Where the client knows no position yet (librdkafka before the first message), where the source
        placed the partition counts. The fetch that follows the seek brings the backward jump to :meth:`_note_reset`.
        """
        now, past = time.monotonic(), []
        with self._cond:
            for tp, position in positions.items():
                key = (tp.topic, tp.partition)
                at = position if position is not None else self._expect.get(key)
                high = self._consumer.highwater(tp)
                if at is None or high is None or at <= high:
                    self._past_end_since.pop(key, None)
                elif now - self._past_end_since.setdefault(key, now) >= _PAST_END_S:
                    past.append(tp)
        if not past:
            return
        try:
            beginnings = self._consumer.beginning_offsets(past, timeout_ms=_PAST_END_OFFSETS_TIMEOUT_MS)
        except KafkaError as err:
            log.warning("%s are past their end, but their beginning offsets are unavailable (%s)", past, err)
            return
        for tp, beginning in beginnings.items():
            with contextlib.suppress(IllegalStateError, KafkaError):  # revoked meanwhile: the next owner sees it
                self._consumer.seek(tp, beginning)
                log.info("topic %s partition %d: past its end; reading it again from offset %d", *tp, beginning)
            with self._cond:
                self._past_end_since.pop((tp.topic, tp.partition), None)

    def _commit_start_offsets(self) -> None:
        """Commit where newly assigned partitions start (``from_checkpoint``), so the group agrees with the model."""
        with self._cond:
            starts, self._start_commits = self._start_commits, {}
        if not starts:
            return
        # A partition the group holds no offset for agrees with the model already; one it holds a stale
        # offset for (an older run's) is moved back to where the model starts.
        earliest = [TopicPartition(*key) for key, (offset, _) in starts.items() if offset is None]
        if earliest:
            try:
                earliest = [tp for tp in earliest if self._consumer.committed(tp) is not None]
                first = self._consumer.beginning_offsets(earliest, timeout_ms=_OFFSETS_TIMEOUT_MS) if earliest else {}
            except KafkaError as err:
                log.warning("earliest offsets unavailable (%s); committing the start offsets later", err)
                with self._cond:
                    self._start_commits = {**starts, **self._start_commits}
                return
            starts.update({(tp.topic, tp.partition): (offset, 0) for tp, offset in first.items()})
        with self._cond:
            for key, (offset, within) in starts.items():
                if key in self._assigned and offset is not None and (offset, within) > self._learned(key):
                    self._pending[key] = offset
                    self._pending_within[key] = within
        self._commit_pending()

    def _commit_pending(self) -> None:
        with self._cond:
            offsets, self._pending = self._pending, {}
            within, self._pending_within = self._pending_within, {}
            if offsets:
                self._commit_due = time.monotonic() + self._commit_interval_s
        if not offsets:
            return
        self._share(offsets, within)  # learned whatever the broker answers; before a revoke lets the partition go
        try:
            self._consumer.commit(_kafka_offsets(offsets, within))
        except KafkaError as err:
            log.warning("commit of %s failed (%s); retrying with the next commit or on revoke", offsets, err)
            with self._cond:  # unless a newer commit superseded them; a lost partition's are dropped on loss
                for key in offsets.keys() - self._pending.keys():
                    if key in self._assigned:
                        self._pending[key] = offsets[key]
                        self._pending_within[key] = within.get(key, 0)
                self._cond.notify_all()  # a revoke waiting for these offsets can take them now
            return
        with self._cond:
            self._record_committed(offsets, within)
            self._cond.notify_all()

    def _share(self, offsets: dict[Key, int], within: dict[Key, int]) -> None:
        """Tell the run's other consumers how far the learner got: only ever forward (the fetch thread and a revoke
        may share one partition's offsets in either order)."""
        if self._run_offsets is None:
            return
        with self._share_lock:
            for key, offset in offsets.items():
                done = (offset, within.get(key, 0))
                if done <= self._shared.get(key, (-1, 0)):
                    continue
                try:
                    self._run_offsets.put(key, *done)
                except Exception as err:  # the store goes only with the run, whose restart rereads the checkpoint
                    log.warning("cannot share the commit of %s with this run's other workers: %s", key, err)
                    continue
                self._shared[key] = done

    def _record_committed(self, offsets: dict[Key, int], within: dict[Key, int]) -> None:
        self.committed.update(offsets)
        self._committed_within.update({key: within.get(key, 0) for key in offsets})

    def _update_lag(self) -> None:
        """Ask the broker for the end offset and learn the position of every assigned partition."""
        partitions = list(self._consumer.assignment())
        if not partitions:
            return
        try:
            ends = self._consumer.end_offsets(partitions, timeout_ms=_OFFSETS_TIMEOUT_MS)
        except KafkaError as err:
            log.debug("end offsets unavailable (%s); the lag keeps the last known ones", err)
            ends = {}
        positions: dict[TopicPartition, int | None] = {}
        for tp in partitions:
            with contextlib.suppress(IllegalStateError, KafkaError):  # reassigned meanwhile, or not resolved yet
                positions[tp] = self._consumer.position(tp, timeout_ms=100)
        with self._cond:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if key not in self._assigned:
                    continue
                # not the last value too: an end that went back (topic recreated) must not freeze the lag
                known = [v for v in (ends.get(tp), self._consumer.highwater(tp)) if v is not None]
                if known:
                    self._ends[key] = max(known)
                if positions.get(tp) is not None:
                    self._positions[key] = positions[tp]
        self._count_deleted()
        self._restart_past_end(positions)

    # --- rebalance listener (kafka-python's IO thread) ------------------------------------------------

    async def _revoke(
        self, keys: set[Key], pause: Callable[[float], Awaitable[object]]
    ) -> tuple[dict[Key, int], dict[Key, int]]:
        """Drop undelivered records of ``keys``, wait for the learner's commit, return what to commit (offsets and
        their ``within``).

        The wait awaits ``pause`` between looks instead of blocking: the listener runs on the client's event loop,
        which also sends the heartbeats, and a member silent for ``session_timeout_ms`` is evicted (its commit on
        revoke refused, the next owner learning the held records again)."""
        with self._cond:
            self._drop(keys, finishing=True)
            if self._stop.is_set() and not self._flush_on_close:
                return {}, {}
            held = {k for k in keys if k in self._delivered}
        deadline = time.monotonic() + self._revoke_timeout_s
        while not self._settled(held) and time.monotonic() < deadline:
            await pause(_REVOKE_LOOK_S)
        with self._cond:
            if not self._settled(held):
                log.warning("revoked %s before the learner committed them; records will be delivered again", held)
            within = {k: self._pending_within.pop(k, 0) for k in keys if k in self._pending}
            return {k: self._pending.pop(k) for k in list(self._pending) if k in keys}, within

    def _settled(self, held: set[Key]) -> bool:
        """The learner has committed all it was handed of ``held`` (or the source is closing)."""
        with self._cond:
            # a message handed over in part is not done until its last sample is: Kafka commits whole messages
            done = (
                k not in self._partial
                and max(self._pending.get(k, -1), self.committed.get(k, -1)) >= self._delivered.get(k, -1)
                for k in held
            )
            return self._stop.is_set() or all(done)

    def _forget(self, keys: set[Key], offsets: dict[Key, int], within: dict[Key, int]) -> None:
        with self._cond:
            self._record_committed(offsets, within)
            self._drop(keys)
            self._group_within -= keys
            for key in keys:
                self._assigned.discard(key)
                tables = (self._delivered, self._pending, self._pending_within, self._ends, self._positions)
                for table in (*tables, self._buffered, self._skip, self._expect, self._gaps, self._past_end_since):
                    table.pop(key, None)

    def _assign(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        with self._cond:
            rewind, self._rewind = self._rewind, {}
            self._assigned.update(_keys(partitions))
            for key in _keys(partitions):  # what was committed before is stale: another member may have gone on
                self.committed.pop(key, None)
                self._committed_within.pop(key, None)
            if partitions and self.assigned_at is None:
                self.assigned_at = time.monotonic()
        for tp in partitions:
            key = (tp.topic, tp.partition)
            first = key not in self._placed
            self._placed.add(key)
            offset = self._start.pop(key, None)
            skip = self._start_within.pop(key, 0)
            handed = self._handed_over(key)
            if handed is not None:  # a consumer of this run learned from it: go on where its learner got
                # (or where this one's own dropped records began, if that is further: its learner holds the rest)
                (offset, skip), first = max(handed, rewind.get(key, handed)), False
            elif offset is None:
                offset, skip = rewind.get(key, (None, 0))
            if offset is None and not (first and self._from_checkpoint):
                with self._cond:  # starts at the group's offset: read its metadata before taking records in
                    self._group_within.add(key)
            if offset is not None:
                self._consumer.seek(tp, offset)
                with self._cond:
                    self._expect[key] = offset
                    self._skip.pop(key, None)
                    if skip:
                        self._skip[key] = (offset, skip)
            elif first and self._from_checkpoint:
                self._consumer.seek_to_beginning(tp)
            if first and self._from_checkpoint:
                with self._cond:
                    self._start_commits[key] = (offset, skip if offset is not None else 0)

    def _pending_of(self, keys: set[Key]) -> tuple[dict[Key, int], dict[Key, int]]:
        with self._cond:
            offsets = {k: v for k, v in self._pending.items() if k in keys}
            return offsets, {k: self._pending_within.get(k, 0) for k in offsets}

    def _handed_over(self, key: Key) -> tuple[int, int] | None:
        if self._run_offsets is None:
            return None
        try:
            return self._run_offsets.get(key)
        except Exception as err:
            log.warning("cannot read where this run's workers left %s (%s); starting as its first owner", key, err)
            return None

    def _drop(self, keys: set[Key], *, finishing: bool = False) -> None:
        """Forget undelivered records of ``keys`` and remember where they began.

        kafka-python keeps its fetch position for a partition that is assigned again after an eager rebalance,
        so without a seek back to the first dropped record (done on the next assignment) those records would
        be skipped. A message handed over or skipped in part is read again from its start, skipping that part.
        ``finishing`` (a revoke) keeps the rest of a message handed over in part, for the learner to finish
        before the revoke commits it: the next owner would read that message from its first sample.
        """
        kept: deque[Record | DeadLetter] = deque()
        for entry in self._buffer:
            pos = _position(entry)
            key = (pos.stream, pos.partition)
            if finishing and key in keys and self._partial.get(key, (-1, 0))[0] == pos.offset:
                kept.append(entry)
            elif key in keys:
                if key not in self._rewind or pos.offset < self._rewind[key][0]:
                    # samples before the first dropped one were handed over or skipped already
                    self._rewind[key] = (pos.offset, pos.index)
            else:
                kept.append(entry)
        self._buffer = kept
        self.buffered_bytes = sum(map(held_bytes, kept))
        for key in keys:
            if finishing and key in self._partial:
                self._buffered[key] = 1  # the message being finished
                continue
            self._buffered.pop(key, None)
            self._partial.pop(key, None)


class _Rebalance(AsyncConsumerRebalanceListener):
    """Async so the revoke-time commit can be awaited on kafka-python's IO loop (a blocking commit raises there),
    and the wait for the learner's commit sleeps on it without stopping the heartbeats."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        keys = _keys(revoked)
        offsets, within = await self._source._revoke(keys, self._pause)
        self._source._share(offsets, within)  # learned, even if the commit below fails
        if offsets:
            try:
                await self._source._consumer.commit_async(_kafka_offsets(offsets, within))
            except KafkaError as err:
                log.warning("commit on revoke failed (%s); records will be delivered again", err)
                offsets = {}
        self._source._forget(keys, offsets, within)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._assign(assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        keys = _keys(lost)
        self._source._share(*self._source._pending_of(keys))  # learned, though no longer ours to commit
        self._source._forget(keys, {}, {})

    def _pause(self, seconds: float) -> Awaitable[object]:
        """A sleep of the loop running this listener, which goes on meanwhile: kafka-python 3's own (not asyncio's),
        or asyncio's where the client runs the listener with ``asyncio.run`` (``LibrdkafkaConsumer``)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._source._consumer._net.sleep(seconds)
        return asyncio.sleep(seconds)


def _keys(partitions: Iterable[TopicPartition]) -> set[Key]:
    return {(tp.topic, tp.partition) for tp in partitions}


def _kafka_offsets(offsets: dict[Key, int], within: Mapping[Key, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {
        TopicPartition(*key): OffsetAndMetadata(offset, within_metadata(within.get(key, 0)), -1)
        for key, offset in offsets.items()
    }


def _decode(decoder: Callable[[Message, int], Any], record, max_bytes: int) -> list:
    """A client's record through ``decoder`` (by default :func:`consumers.wire.decode_samples`) as a list, with an
    :class:`UnreadableRecord` an ``undecodable`` dead letter and a message whose decoding raises an ``internal`` one."""
    message = message_from_record(record)
    if type(record) is UnreadableRecord:
        return [DeadLetter(message, "undecodable", record.detail)]
    try:
        decoded = decoder(message, max_bytes)
    except Exception as err:  # a decoder bug must cost one record, not the fetch thread
        return [DeadLetter(message, "internal", f"{type(err).__name__}: {err}")]
    return decoded if isinstance(decoded, list) else [decoded]


def _guarded(method, partitions: Iterable[TopicPartition]) -> None:
    """pause/resume, tolerating a partition that a rebalance took away meanwhile."""
    with contextlib.suppress(KeyError, IllegalStateError):
        method(*partitions)


def _position(entry: Record | DeadLetter) -> Position:
    return entry.message.position if isinstance(entry, DeadLetter) else entry.position


def message_from_record(r) -> Message:
    """A kafka-python ``ConsumerRecord`` as a :class:`Message` (timestamp in seconds; a null value as b"")."""
    headers = tuple((k, v if v is not None else b"") for k, v in (r.headers or ()))
    return Message(Position(r.topic, r.partition, r.offset), r.timestamp / 1000.0, r.key, r.value or b"", headers)


def unreadable_records(err: Exception, most: int) -> tuple[TopicPartition, list[UnreadableRecord]] | None:
    """The partition and the records (at most ``most``) that kafka-python's record reader stopped at with ``err``;
    None if ``err`` was not raised by that reader.

    The reader (``Fetcher.PartitionRecords._unpack_records``, a generator) is found among the frames ``err`` was
    raised through, also when kafka-python raises it again on a later poll: its locals say which partition, the
    first offset not handed over and the batch it was reading (the error names no offset for a header it cannot
    decode). The batch's end is trusted only if the batch passed its CRC check, i.e. the error came from reading
    its records, not from the reader's own CRC checks.
    """
    tb = err.__traceback__
    while tb is not None and not _is_record_reader(tb.tb_frame):
        tb = tb.tb_next
    if tb is None:
        return None
    reader, batch = tb.tb_frame.f_locals["self"], tb.tb_frame.f_locals.get("batch")
    first = last = max(reader.fetch_offset, reader.next_fetch_offset)
    checked = reader.check_crcs and tb.tb_next is not None
    if checked and isinstance(batch, DefaultRecordBatch) and batch.last_offset >= first:  # else: a batch before it
        first, last = max(first, batch.base_offset), batch.last_offset
        detail = f"the Kafka client cannot read offsets {first}-{last}, the rest of their record batch: {err}"
    else:
        detail = f"the Kafka client cannot read offset {first}: {err}"
    tp = reader.topic_partition
    offsets = range(first, min(last, first + most - 1) + 1)
    return tp, [UnreadableRecord(tp.topic, tp.partition, offset, detail) for offset in offsets]


def _is_record_reader(frame: FrameType) -> bool:
    return frame.f_code.co_name == "_unpack_records" and isinstance(
        frame.f_locals.get("self"), Fetcher.PartitionRecords
    )
