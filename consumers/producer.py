"""Producing messages to Kafka byte for byte (``stream-cl produce`` and ``replay``), optionally paced."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from consumers.record import Message

MAX_REQUEST_BYTES = 16 * 1024 * 1024
COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")
_MAX_TIMESTAMP_S = 2**63 // 1000  # Kafka timestamps are int64 milliseconds
"""Every compression codec Kafka defines; the project installs the libraries for all of them."""


def new_producer(bootstrap: str, **overrides: object) -> KafkaProducer:
    """A kafka-python producer with the project's defaults.

    ``enable_idempotence`` is off: some Kafka-compatible brokers (tansu) reject the producer-id handshake
    after a restart, and replay/produce tools re-send whole streams anyway.

    Raises
    ------
    ConnectionError
        If no broker answers at ``bootstrap``.
    """
    config: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "enable_idempotence": False,
        "max_request_size": MAX_REQUEST_BYTES,
        "client_id": "stream-cl",
    }
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except KafkaError as err:
        raise ConnectionError(f"cannot reach Kafka at {bootstrap}: {err}") from err


class KafkaSink:
    """Send :class:`Message` values, keys and headers unchanged to one topic, in order.

    Partitions follow the key (Kafka's default partitioner) unless ``keep_partitions`` is set, in which case
    each message goes to the partition it was recorded from (which must exist in the target topic). Messages are
    stamped when sent unless ``keep_timestamps`` is set: then each carries its own timestamp (event time, which
    delayed labels join and expire by); a missing or unrepresentable one (negative, NaN) takes the previous
    message's (the time of sending would move a consumer's event-time clock decades ahead of a recording).
    ``compression`` (one of :data:`COMPRESSION`) compresses each batch. One request is in flight at a time, so
    a retried batch cannot land behind a later one. A message the broker or client refuses (too large, say)
    is counted in :attr:`failed` and the stream goes on; a broker that takes nothing for ``max_block_ms``
    (gone, or its buffer full) stops it: :meth:`send` raises :class:`ConnectionError`. :meth:`flush` and
    :meth:`close` raise :class:`ConnectionError` if any message failed, saying how many were delivered.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        keep_partitions: bool = False,
        keep_timestamps: bool = False,
        compression: str = "none",
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if compression not in COMPRESSION:
            raise ValueError(f"compression must be one of {COMPRESSION}, got {compression!r}")
        self.topic = topic
        self.keep_partitions = keep_partitions
        self.keep_timestamps = keep_timestamps
        self._stamp: int | None = None  # the last timestamp kept
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self._counting = threading.Lock()  # callbacks run on the producer's I/O thread, or here if already done
        self._first_error: BaseException | None = None  # a count and one example: failures must not pile up
        options = {
            "compression_type": None if compression == "none" else compression,
            "max_in_flight_requests_per_connection": 1,
            **(client_options or {}),
        }
        self._producer = new_producer(bootstrap, **options)

    def send(self, message: Message) -> None:
        partition = message.position.partition if self.keep_partitions else None
        if self.keep_timestamps and (kept := _timestamp_ms(message.timestamp)) is not None:
            self._stamp = kept
        stamp = self._stamp if self.keep_timestamps else None
        try:
            future = self._producer.send(
                self.topic,
                value=message.value,
                key=message.key,
                headers=list(message.headers),
                partition=partition,
                timestamp_ms=stamp,
            )
        except KafkaTimeoutError as err:  # no metadata or no buffer space within max_block_ms: nothing gets through
            raise ConnectionError(f"Kafka took no message to {self.topic} in time: {self._tally()}: {err}") from err
        except KafkaError as err:  # refused before sending (larger than max_request_size): this message only
            self._failure(err)
        else:
            future.add_callback(self._delivery).add_errback(self._failure)
        self.sent += 1

    def flush(self) -> None:
        """Wait until every sent message is acknowledged or failed; raise if any failed."""
        self._producer.flush()
        if self.failed:
            raise ConnectionError(f"messages to {self.topic} failed: {self._tally()}; first: {self._first_error}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()

    def _delivery(self, _metadata: object) -> None:
        with self._counting:
            self.delivered += 1

    def _failure(self, err: BaseException) -> None:
        with self._counting:
            self.failed += 1
            if self._first_error is None:
                self._first_error = err

    def _tally(self) -> str:
        return f"{self.delivered} of {self.sent} sent delivered, {self.failed} failed"

    def __enter__(self) -> KafkaSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def produce_messages(
    bootstrap: str,
    topic: str,
    messages: Iterable[Message],
    *,
    speed: float | None = None,
    keep_partitions: bool = False,
    keep_timestamps: bool = False,
    compression: str = "none",
    client_options: Mapping[str, Any] | None = None,
) -> int:
    """Send ``messages`` to ``topic`` (paced by their timestamps when ``speed`` is given); returns the count.

    ``client_options`` are kafka-python security settings (``security_protocol``, ``sasl_*``, ``ssl_*``).
    """
    sink = KafkaSink(
        bootstrap,
        topic,
        keep_partitions=keep_partitions,
        keep_timestamps=keep_timestamps,
        compression=compression,
        client_options=client_options,
    )
    with sink:
        for message in paced(messages, speed) if speed else messages:
            sink.send(message)
    return sink.sent


def _timestamp_ms(seconds: float) -> int | None:
    """A message timestamp in Kafka's milliseconds since the epoch; None where it has none: a record without one
    reads as -1 ms, and a recorded file may hold any float."""
    if not 0 <= seconds < _MAX_TIMESTAMP_S:  # NaN fails this too
        return None
    return round(seconds * 1000)


def paced(
    messages: Iterable[Message],
    speed: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Message]:
    """Yield messages no sooner than their original spacing divided by ``speed`` (2.0 = twice as fast).

    Times are relative to the first message; a timestamp earlier than the previous one does not wait, nor does a
    timestamp that is not finite (a damaged file's NaN or inf would make the wait NaN or unsleepable).

    >>> from consumers.record import Position
    >>> slept = []
    >>> msgs = [Message(Position("t", 0, i), 10.0 + i, None, b"") for i in range(3)]
    >>> _ = list(paced(msgs, 2.0, clock=lambda: 0.0, sleep=slept.append))
    >>> slept
    [0.5, 1.0]
    """
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    start_wall = start_ts = None
    for message in messages:
        if not math.isfinite(message.timestamp):
            yield message
            continue
        if start_wall is None:
            start_wall, start_ts = clock(), message.timestamp
        else:
            wait = start_wall + (message.timestamp - start_ts) / speed - clock()
            if wait > 0:
                sleep(wait)
        yield message
