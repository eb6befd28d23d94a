"""Producing messages to Kafka byte for byte (``stream-cl produce`` and ``replay``), optionally paced."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from consumers.record import Message

MAX_REQUEST_BYTES = 16 * 1024 * 1024
COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")
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
    """Send :class:`Message` values, keys and headers unchanged to one topic.

    Partitions follow the key (Kafka's default partitioner) unless ``keep_partitions`` is set, in which case
    each message goes to the partition it was recorded from (which must exist in the target topic).
    ``compression`` (one of :data:`COMPRESSION`) compresses each batch. Failed sends are raised, as
    :class:`ConnectionError`, by the next :meth:`flush` or :meth:`close`.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        keep_partitions: bool = False,
        compression: str = "none",
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if compression not in COMPRESSION:
            raise ValueError(f"compression must be one of {COMPRESSION}, got {compression!r}")
        self.topic = topic
        self.keep_partitions = keep_partitions
        self.sent = 0
        self._producer = new_producer(
            bootstrap, compression_type=None if compression == "none" else compression, **(client_options or {})
        )
        self._errors: list[BaseException] = []

    def send(self, message: Message) -> None:
        partition = message.position.partition if self.keep_partitions else None
        future = self._producer.send(
            self.topic, value=message.value, key=message.key, headers=list(message.headers), partition=partition
        )
        future.add_errback(self._errors.append)
        self.sent += 1

    def flush(self) -> None:
        """Wait until every sent message is acknowledged; raise the first failure."""
        self._producer.flush()
        if self._errors:
            raise ConnectionError(f"{len(self._errors)} messages to {self.topic} failed: {self._errors[0]}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()

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
    compression: str = "none",
    client_options: Mapping[str, Any] | None = None,
) -> int:
    """Send ``messages`` to ``topic`` (paced by their timestamps when ``speed`` is given); returns the count.

    ``client_options`` are kafka-python security settings (``security_protocol``, ``sasl_*``, ``ssl_*``).
    """
    sink = KafkaSink(
        bootstrap, topic, keep_partitions=keep_partitions, compression=compression, client_options=client_options
    )
    with sink:
        for message in paced(messages, speed) if speed else messages:
            sink.send(message)
    return sink.sent


def paced(
    messages: Iterable[Message],
    speed: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Message]:
    """Yield messages no sooner than their original spacing divided by ``speed`` (2.0 = twice as fast).

    Times are relative to the first message; a timestamp earlier than the previous one does not wait.

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
        if start_wall is None:
            start_wall, start_ts = clock(), message.timestamp
        else:
            wait = start_wall + (message.timestamp - start_ts) / speed - clock()
            if wait > 0:
                sleep(wait)
        yield message
