"""Dead-letter sinks: where records that cannot be learned go, whole, with the reason why.

A dead letter keeps the original key, value and headers byte for byte and adds headers
``reason`` (one of :data:`consumers.wire.REASONS` or the run loop's reasons), ``detail`` (the reason's
explanation, cut to :data:`MAX_DETAIL_CHARS` characters) and ``source-topic`` / ``source-partition`` /
``source-offset`` (where it was read). A bad sample of a message of several (wire format 2) is that sample
alone, with headers ``source-sample`` and ``source-samples`` too. Delivery is at-least-once: a dead letter
sent twice (after a crash) carries the same source position both times, which is how a reader of the topic
recognises the duplicate.

Both sinks implement the run loop's ``DeadLetterSink`` protocol (``send(dead)``) plus ``backpressure`` (the
caller must not poll more records while it is True), ``healthy`` (False while dead letters cannot be
delivered) and the counters ``spooled``, ``delivered`` and ``rejected``.

:class:`KafkaDeadLetterSink` never makes the learner wait for the broker. ``send`` writes the dead letter to
a local :class:`~consumers.spool.Spool` (one uncompressed file; no network I/O) and returns. Its cost grows
with the dead letter's size: about 2 ms for 1 MiB, within 50 ms up to 8 MiB (the decoder's default
``max_bytes``); only a larger ``oversized`` value takes longer. One sender thread delivers the spool to the
topic oldest first, and deletes each file once the broker has acknowledged it. A sender thread rather than
kafka-python's asynchronous ``send``: that ``send`` itself blocks (up to ``max_block_ms``) while the producer
has no metadata, which is exactly the outage case, and the producer's in-memory buffer dies with the
process. Because every dead letter is on
disk before ``send`` returns, the run loop may commit past a bad record at once, and a spool left by a
crashed process is delivered by the next sink opened on the same ``spool_dir``. The one exception is a spool
write that fails (disk full, file size limit): the dead letter is then held in memory, the sink reports
``backpressure`` and is not ``healthy`` (so the caller polls no more), and the sender thread retries the
write every ``retry_s``; a crash before it succeeds loses the held dead letters.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.errors import InvalidTopicError, MessageSizeTooLargeError

from consumers.producer import new_producer
from consumers.record import DeadLetter, Message
from consumers.recorded import DurableRecordedWriter, RecordedStreamError
from consumers.spool import Entry, Spool
from consumers.wire import sample_message

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
MAX_DETAIL_CHARS = 500
"""The ``detail`` header holds at most this many characters of the reason's explanation."""
DEFAULT_SPOOL_MAX_BYTES = 64 * 1024 * 1024
_BATCH = 256
"""Dead letters handed to the producer before waiting for their acks."""
_UNDELIVERABLE = (MessageSizeTooLargeError, InvalidTopicError, RecordedStreamError)
"""Failures of one dead letter itself, not of the broker: retrying cannot help, so it is set aside."""


def dead_letter_headers(dead: DeadLetter) -> tuple[tuple[str, bytes], ...]:
    """Original headers plus ``reason``, ``detail`` and the source position.

    >>> from consumers.record import Position
    >>> m = Message(Position("images", 2, 7), 0.0, b"k", b"{", (("content-type", b"application/json"),))
    >>> [k for k, _ in dead_letter_headers(DeadLetter(m, "bad_json", "Expecting value"))]
    ['content-type', 'reason', 'detail', 'source-topic', 'source-partition', 'source-offset']
    """
    return dead_letter_message(dead).headers


def dead_letter_message(dead: DeadLetter) -> Message:
    """The message a dead letter is stored and sent as: the original with the dead-letter headers.

    A dead letter of one sample of a message of several (wire format 2) holds that sample alone
    (:func:`consumers.wire.sample_message`) and adds headers ``source-sample`` (its index in the message)
    and ``source-samples`` (how many the message had).
    """
    m = sample_message(dead.message)
    pos = m.position
    headers = (
        *m.headers,
        ("reason", dead.reason.encode()),
        ("detail", dead.detail[:MAX_DETAIL_CHARS].encode()),
        ("source-topic", pos.stream.encode()),
        ("source-partition", str(pos.partition).encode()),
        ("source-offset", str(pos.offset).encode()),
    )
    if pos.count > 1:
        headers += (("source-sample", str(pos.index).encode()), ("source-samples", str(pos.count).encode()))
    return Message(pos, m.timestamp, m.key, m.value, headers)


class KafkaDeadLetterSink:
    """Produce dead letters to ``topic``, or to ``<source topic>.dlq`` when ``topic`` is None.

    ``send`` only spools (see the module docstring); the sender thread delivers in order, waiting at most
    ``timeout_s`` for the broker on each attempt and ``retry_s`` between failed attempts. While attempts fail
    :attr:`healthy` is False and dead letters accumulate in the spool; when the spool holds
    ``spool_max_bytes`` or more, :attr:`backpressure` is True until delivery frees space. ``send`` never
    refuses a dead letter, so the bound is exceeded by what the caller had already polled.

    When the spool cannot be written (its disk is full), ``send`` holds the dead letter in memory instead of
    raising; while any is held, later ones join it in order, :attr:`backpressure` is True and :attr:`healthy`
    False, so the memory held is bounded by what the caller had already polled. The sender thread retries
    writing them every ``retry_s`` (and once more at close; what is still held then is lost, and logged).

    ``spool_dir`` defaults to a new temporary directory, which a restarted process does not know about:
    pass a fixed directory so that dead letters spooled before a crash are delivered after it. A dead letter
    the broker rejects for itself (too large, invalid topic name) stays in the spool directory as a
    ``*.rejected`` file, is logged and counted in :attr:`rejected` (``streamcl_dead_letter_rejected_total``);
    everything else is retried until delivered.

    Raises
    ------
    RuntimeError
        If another sink holds ``spool_dir``.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str | None = None,
        timeout_s: float = 10.0,
        client_options: Mapping[str, Any] | None = None,
        spool_dir: str | Path | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        retry_s: float = 1.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._client_options = dict(client_options or {})
        self._temporary_spool = spool_dir is None
        if spool_dir is None:
            spool_dir = tempfile.mkdtemp(prefix="stream-cl-dlq-")
            log.warning("dead letters spool in %s; pass spool_dir= to deliver them after a crash", spool_dir)
        self._spool = Spool(spool_dir, spool_max_bytes)
        self.sent = 0
        self.delivered = 0
        self.rejected = 0
        self._failing = False
        self._held: deque[Message] = deque()
        self._held_lock = threading.Lock()  # learner and sender both write held dead letters, oldest first
        self._spool_error: OSError | None = None
        self._producer: KafkaProducer | None = None
        self._wake = threading.Condition()
        self._retry_at = 0.0
        self._close_by: float | None = None
        self._sender = threading.Thread(target=self._deliver_until_closed, name="dead-letters", daemon=True)
        self._sender.start()

    @property
    def spool_dir(self) -> Path:
        return self._spool.directory

    @property
    def spooled(self) -> int:
        """Dead letters not yet acknowledged by the broker (in the spool, or held while it cannot be written)."""
        return len(self._spool) + len(self._held)

    @property
    def backpressure(self) -> bool:
        """True while the spool is full or cannot be written: the caller must not poll more records."""
        return self._spool.full or bool(self._held)

    @property
    def healthy(self) -> bool:
        """False from a failed delivery attempt until an attempt succeeds again, while dead letters are held
        because the spool cannot be written, and once the sender has stopped."""
        return not self._failing and not self._held and (self._sender.is_alive() or self._close_by is not None)

    def send(self, dead: DeadLetter) -> None:
        """Spool ``dead`` for delivery (or hold it, see the class docstring); returns without waiting for the broker."""
        if self._close_by is not None:
            raise RuntimeError("dead-letter sink is closed")
        with self._held_lock:
            self._held.append(dead_letter_message(dead))
            if len(self._held) == 1:  # else older ones wait for the disk (the sender retries): join them
                self._write_held()
        self.sent += 1
        with self._wake:
            self._wake.notify()

    def close(self, timeout_s: float | None = None) -> None:
        """Deliver what can be delivered within ``timeout_s`` (default ``timeout_s`` of the sink), then stop.

        Delivery stops at the bound or at the first failed attempt (at once if the broker is already
        unreachable or the spool cannot be written). Dead letters still spooled stay in ``spool_dir`` and are
        delivered by the next sink opened on it; held ones are written there if the disk takes them now.
        """
        bound = self.timeout_s if timeout_s is None else timeout_s
        with self._wake:
            if self._close_by is None:
                self._close_by = time.monotonic() + bound
            self._wake.notify()
        self._sender.join(bound)
        if self._sender.is_alive():
            log.warning("dead-letter sender still waiting on the broker at close; it stops after this attempt")

    def __enter__(self) -> KafkaDeadLetterSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_held(self) -> None:
        """Move held dead letters to the spool, oldest first, until its disk refuses one; the caller holds
        ``_held_lock``. A refused one stays held, to be retried by the sender thread after ``retry_s``."""
        while self._held:
            try:
                self._spool.put(self._held[0])
            except OSError as err:  # disk full, file size limit, read-only: never the learner's crash
                if self._spool_error is None:
                    log.error("dead-letter spool %s cannot be written, holding dead letters: %s", self.spool_dir, err)
                self._spool_error = err
                self._retry_at = time.monotonic() + self.retry_s
                return
            self._held.popleft()
        if self._spool_error is not None:
            log.info("dead-letter spool %s can be written again", self.spool_dir)
            self._spool_error = None

    def _deliver_until_closed(self) -> None:
        try:
            while self._wait_for_work():
                try:
                    if self._held:
                        with self._held_lock:
                            self._write_held()
                    if len(self._spool):
                        self._deliver_batch()
                except OSError as err:  # the spool's disk (full, read-only): retry, never end the sender
                    log.error("dead-letter spool %s failed: %s; retrying", self.spool_dir, err)
                    self._failing, self._retry_at = True, time.monotonic() + self.retry_s
        finally:
            self._drop_producer()
            self._release_spool()

    def _release_spool(self) -> None:
        with self._held_lock:
            self._write_held()  # a last try: what reaches the spool is delivered by the next start
            if self._held:
                log.error(
                    "%d dead letters are lost: the spool %s could not be written (%s)",
                    len(self._held),
                    self.spool_dir,
                    self._spool_error,
                )
        left = len(self._spool)
        self._spool.close()
        if left and self._temporary_spool:
            log.error(
                "%d dead letters were not delivered; the temporary spool %s is not seen by a later start "
                "(give --dead-letter-spool or --checkpoint-dir to keep them)",
                left,
                self.spool_dir,
            )
        elif left:
            log.warning("%d dead letters stay in %s for the next start", left, self.spool_dir)
        elif self._temporary_spool:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    def _wait_for_work(self) -> bool:
        """Wait until there is something to deliver and no retry pause; False once closing is done."""
        with self._wake:
            while True:
                now = time.monotonic()
                closing = self._close_by is not None
                work = len(self._spool) > 0 or len(self._held) > 0
                # closing stops at the first failure (the broker's or the disk's): the rest waits in the spool
                # for the next start, held dead letters after a last try to write them there
                failing = self._failing or self._spool_error is not None
                if closing and (not work or now >= self._close_by or failing):
                    return False
                if work and now >= self._retry_at:
                    return True
                waits = [t - now for t in (self._retry_at, self._close_by) if t is not None and t > now]
                self._wake.wait(min(waits) if work and waits else None)

    def _deliver_batch(self) -> None:
        batch = self._spool.oldest(_BATCH)
        try:
            delivered, error = self._produce(batch)
        except Exception as err:  # the sender thread must outlive any client failure; the batch is retried
            delivered, error = 0, err
        self._spool.remove(delivered)
        self.delivered += delivered
        if error is None:
            if self._failing:
                log.info("dead letters are delivered again (%d still spooled)", len(self._spool))
            self._failing = False
        elif isinstance(error, _UNDELIVERABLE):
            self._spool.remove(1, keep_as_rejected=True)
            self.rejected += 1
            log.error("dead letter cannot be delivered, kept as %s.rejected: %s", batch[delivered][0].path, error)
        else:
            if not self._failing:
                log.warning("dead letters cannot be delivered, spooling in %s: %s", self.spool_dir, error)
            self._failing = True
            self._retry_at = time.monotonic() + self.retry_s
            self._drop_producer()

    def _produce(self, batch: list[tuple[Entry, Message | None]]) -> tuple[int, BaseException | None]:
        """Send ``batch`` in order; how many were acknowledged from its start, and the first failure."""
        producer = self._producer or self._connect()
        futures, error = [], None
        for entry, message in batch:
            if message is None:
                error = RecordedStreamError(f"{entry.path} cannot be read")
                break
            topic = self.topic or message.position.stream + DLQ_SUFFIX
            try:  # blocks at most max_block_ms, on this thread only
                # one source partition's dead letters share a partition, so they stay in stream order
                partitions = sorted(producer.partitions_for(topic))
                partition = partitions[message.position.partition % len(partitions)]
                headers = list(message.headers)
                futures.append(producer.send(topic, message.value, message.key, headers, partition=partition))
            except Exception as err:
                error = err
                break
        deadline = time.monotonic() + self.timeout_s
        for i, future in enumerate(futures):
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as err:  # KafkaError subclasses, including KafkaTimeoutError
                return i, err
        return len(futures), error

    def _connect(self) -> KafkaProducer:
        timeout_ms = int(self.timeout_s * 1000)
        options: dict[str, Any] = {
            "linger_ms": 0,
            "max_block_ms": timeout_ms,
            "bootstrap_timeout_ms": timeout_ms,
            "request_timeout_ms": timeout_ms,
            "delivery_timeout_ms": timeout_ms,
            "max_in_flight_requests_per_connection": 1,  # a retried request cannot overtake a later one
            **self._client_options,
        }
        self._producer = new_producer(self.bootstrap, **options)
        return self._producer

    def _drop_producer(self) -> None:
        """Close the producer without delivering its leftovers: what it did not ack is retried from the spool."""
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except Exception as err:  # close(0) raises if the producer still held records
                log.debug("dead-letter producer closed with records pending: %s", err)
            self._producer = None


class FileDeadLetterSink:
    """Write dead letters to a recorded-stream file (original positions, added headers as above).

    Each dead letter is on disk, readable after a kill at any moment, before :meth:`send` returns
    (:class:`~consumers.recorded.DurableRecordedWriter`). When the disk refuses one (full, file size limit),
    it is held in memory with any later ones, in order: :attr:`backpressure` is True and :attr:`healthy`
    False until they are written, which reading :attr:`backpressure` retries every ``retry_s`` (the run
    loop reads it before every poll). What is still held at :meth:`close` is lost, and logged. Nothing is
    ever :attr:`rejected`.

    Raises
    ------
    OSError
        If the file cannot be created.
    """

    rejected = 0

    def __init__(self, path: str | Path, *, retry_s: float = 1.0) -> None:
        self.path = Path(path)
        self.retry_s = retry_s
        self.sent = 0
        self._writer = DurableRecordedWriter(self.path)
        self._held: deque[Message] = deque()
        self._retry_at = 0.0

    @property
    def delivered(self) -> int:
        return self._writer.count

    @property
    def spooled(self) -> int:
        """Dead letters held in memory because the disk refused them."""
        return len(self._held)

    @property
    def backpressure(self) -> bool:
        """True while dead letters are held: the caller must not poll more records."""
        if self._held and time.monotonic() >= self._retry_at:
            self._write_held()
        return bool(self._held)

    @property
    def healthy(self) -> bool:
        return not self._held

    def send(self, dead: DeadLetter) -> None:
        self._held.append(dead_letter_message(dead))
        self.sent += 1
        if len(self._held) == 1:  # else older ones wait for the disk: this one joins them, in order
            self._write_held()

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is held if the disk takes it now, then close the file (``timeout_s`` is accepted for
        symmetry with :class:`KafkaDeadLetterSink`)."""
        if self._held:
            self._write_held()
        if self._held:
            log.error("%d dead letters could not be written to %s and are lost", len(self._held), self.path)
        self._writer.close()

    def __enter__(self) -> FileDeadLetterSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_held(self) -> None:
        was_failing = self._retry_at > 0.0
        while self._held:
            try:
                self._writer.write(self._held[0])
            except OSError as err:  # disk full, file size limit: never the learner's crash
                if not was_failing:
                    log.error("dead letters cannot be written to %s, holding them: %s", self.path, err)
                self._retry_at = time.monotonic() + self.retry_s
                return
            self._held.popleft()
        if was_failing:
            log.info("dead letters can be written to %s again", self.path)
            self._retry_at = 0.0
