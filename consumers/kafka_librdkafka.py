"""confluent-kafka (librdkafka) as the client under :class:`~consumers.kafka.KafkaSource`.

:class:`LibrdkafkaConsumer` is a ``confluent_kafka.Consumer`` behind the part of kafka-python's
``KafkaConsumer`` interface that ``KafkaSource`` uses, so the source's logic (buffer, backpressure,
commit after learn, commit before revoke, checkpoint starts, true lag, dead letters) is one and the same
for both clients: ``KafkaSource(..., consumer_class=LibrdkafkaConsumer)``. What differs is only how the
client reaches the broker: librdkafka unpacks record batches in C on threads of its own, where
kafka-python does it in Python.

Differences it bridges:

* Rebalance callbacks run inside ``consume()`` on the calling thread (the source's fetch thread), not on
  an IO thread, so a blocking commit there is fine; the source's async listener is driven to completion
  with :func:`asyncio.run`.
* librdkafka keeps a partition the source paused (backpressure) paused across a revoke and its reassignment;
  kafka-python starts a reassigned partition afresh, so the assignment callback resumes it.
* librdkafka cannot seek a partition during its assignment callback; the seeks the listener asks for
  there become the start offsets of the ``assign()`` call that ends the callback.
* Errors (``KafkaException``) are raised as kafka-python's ``KafkaError``, which the source handles.
* Commit metadata travels in confluent's ``TopicPartition.metadata`` (a string; "" for none).
* A message whose headers confluent-kafka cannot convert (a key that is not UTF-8) is handed over as an
  :class:`~consumers.kafka.UnreadableRecord`, which the source makes an ``undecodable`` dead letter: ``consume()``
  has moved the position past it and the messages fetched with it already, so raising would lose them all.
* Settings are kafka-python's names (``session_timeout_ms``, ``sasl_plain_username``, ...), translated to
  librdkafka's; a name it has no translation for is a ``ValueError``.

Needs the ``librdkafka`` extra (``pip install 'stream-cl[librdkafka]'``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from consumers.kafka import UnreadableRecord

log = logging.getLogger("consumers.kafka_librdkafka")


class MissingExtraError(ImportError, ValueError):
    """confluent-kafka is not installed; a ValueError too, so the command line reports it as a usage error."""

    def __init__(self) -> None:
        super().__init__("the librdkafka Kafka client needs confluent-kafka: pip install 'stream-cl[librdkafka]'")


SETTINGS = {
    "bootstrap_servers": "bootstrap.servers",
    "group_id": "group.id",
    "client_id": "client.id",
    "enable_auto_commit": "enable.auto.commit",
    "auto_offset_reset": "auto.offset.reset",
    "isolation_level": "isolation.level",
    "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms",
    "max_poll_interval_ms": "max.poll.interval.ms",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
}
"""kafka-python setting -> librdkafka setting, for every setting stream-cl passes to a consumer."""

_METADATA_TIMEOUT_S = 10.0


def librdkafka():
    """The ``confluent_kafka`` module, imported on first use: it is an extra, and importing it costs about 50 ms
    that a run on kafka-python (or ``stream-cl --help``) should not pay.

    Raises :class:`MissingExtraError`, naming the extra, when it is not installed.
    """
    try:
        import confluent_kafka
    except ImportError as err:
        raise MissingExtraError from err
    return confluent_kafka


def librdkafka_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """kafka-python consumer settings as librdkafka's.

    >>> librdkafka_settings({"group_id": "g", "session_timeout_ms": 6000, "enable_auto_commit": False})
    {'group.id': 'g', 'session.timeout.ms': 6000, 'enable.auto.commit': False}
    """
    unknown = sorted(set(options) - set(SETTINGS))
    if unknown:
        raise ValueError(f"no librdkafka equivalent for the Kafka client settings {unknown}")
    return {SETTINGS[name]: value for name, value in options.items()}


def _kafka_errors(method):
    """librdkafka's ``KafkaException`` as kafka-python's ``KafkaError``, which KafkaSource handles."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except librdkafka().KafkaException as err:
            raise KafkaError(str(err.args[0] if err.args else err)) from err

    return wrapped


class _Record:
    """The fields of kafka-python's ``ConsumerRecord`` that :func:`consumers.kafka.message_from_record` reads."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, message) -> None:
        self.topic, self.partition, self.offset = message.topic(), message.partition(), message.offset()
        self.timestamp = message.timestamp()[1]
        self.key, self.value, self.headers = message.key(), message.value(), message.headers()


def _unreadable(message, err: Exception) -> UnreadableRecord:
    """A message whose headers confluent-kafka cannot convert (it raises SystemError for a key that is not UTF-8),
    with its key and value, for an ``undecodable`` dead letter."""
    cause = err.__cause__ or err
    detail = f"the Kafka client cannot convert the record's headers: {type(cause).__name__}: {cause}"
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    return UnreadableRecord(topic, partition, offset, detail, message.timestamp()[1], message.key(), message.value())


class LibrdkafkaConsumer:
    """A ``confluent_kafka.Consumer`` with the kafka-python ``KafkaConsumer`` methods KafkaSource calls.

    Takes kafka-python's keyword settings (see :data:`SETTINGS`). Not thread-safe, like the class it
    stands in for: KafkaSource makes every call from its fetch thread.
    """

    def __init__(self, **options: Any) -> None:
        self._confluent = librdkafka()
        try:  # librdkafka connects lazily: what fails here is a setting
            self._consumer = self._confluent.Consumer(librdkafka_settings(options), logger=log)
        except self._confluent.KafkaException as err:
            raise ValueError(f"librdkafka rejected the consumer settings: {err.args[0]}") from err
        self._paused: set[TopicPartition] = set()
        self._listener = None
        self._seeks: dict[TopicPartition, int] | None = None  # collected during an assignment callback

    # --- group membership ---------------------------------------------------------------------------

    def subscribe(self, topics: list[str], listener) -> None:
        """Subscribe with an ``AsyncConsumerRebalanceListener`` (its coroutines run to completion here)."""
        self._listener = listener
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _on_assign(self, consumer, partitions) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        self._seeks = {}
        try:
            asyncio.run(self._listener.on_partitions_assigned(set(tps)))
            starts = self._seeks
        finally:
            self._seeks = None
        stored = self._confluent.OFFSET_STORED  # the group's committed offset, else auto_offset_reset
        consumer.assign([self._confluent.TopicPartition(t.topic, t.partition, starts.get(t, stored)) for t in tps])
        # librdkafka keeps a partition paused across revoke and reassignment; kafka-python (and ``paused()``)
        # start it afresh, so the source would never resume it and the partition would stall for good
        consumer.resume(self._partitions(tps))

    def _on_revoke(self, consumer, partitions) -> None:
        revoked = {TopicPartition(p.topic, p.partition) for p in partitions}
        self._paused -= revoked
        asyncio.run(self._listener.on_partitions_revoked(revoked))

    def _on_lost(self, consumer, partitions) -> None:
        lost = {TopicPartition(p.topic, p.partition) for p in partitions}
        self._paused -= lost
        asyncio.run(self._listener.on_partitions_lost(lost))

    @_kafka_errors
    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(p.topic, p.partition) for p in self._consumer.assignment()}

    @_kafka_errors
    def topics(self) -> set[str]:
        """Every topic on the broker (a metadata request for all topics creates none)."""
        return set(self._consumer.list_topics(timeout=_METADATA_TIMEOUT_S).topics)

    # --- fetching -----------------------------------------------------------------------------------

    @_kafka_errors
    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[_Record]]:
        """Up to ``max_records`` records per partition, waiting at most ``timeout_ms`` for the first."""
        fetched: dict[tuple[str, int], list[_Record]] = {}
        for message in self._consumer.consume(num_messages=max_records, timeout=timeout_ms / 1000):
            error = message.error()
            if error is not None:  # an event, not a record: librdkafka retries transient ones itself
                if error.fatal():
                    raise self._confluent.KafkaException(error)
                log.warning("Kafka client: %s", error)
                continue
            try:  # the consumer's position is past this message already: a failure here must not lose the rest
                record = _Record(message)
            except Exception as err:
                record = _unreadable(message, err)
            fetched.setdefault((record.topic, record.partition), []).append(record)
        return {TopicPartition(*key): records for key, records in fetched.items()}

    @_kafka_errors
    def pause(self, *partitions: TopicPartition) -> None:
        self._consumer.pause(self._partitions(partitions))
        self._paused.update(partitions)

    @_kafka_errors
    def resume(self, *partitions: TopicPartition) -> None:
        self._consumer.resume(self._partitions(partitions))
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if self._seeks is not None:  # inside the assignment callback: becomes the assigned start offset
            self._seeks[partition] = offset
            return
        _kafka_errors(self._consumer.seek)(self._confluent.TopicPartition(partition.topic, partition.partition, offset))

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self.seek(tp, self._confluent.OFFSET_BEGINNING)

    # --- offsets ------------------------------------------------------------------------------------

    @_kafka_errors
    def commit(self, offsets: Mapping[TopicPartition, Any]) -> None:
        """Commit ``{partition: OffsetAndMetadata}`` and wait for the broker's answer."""
        wanted = [
            self._confluent.TopicPartition(tp.topic, tp.partition, om.offset, om.metadata or "")
            for tp, om in offsets.items()
        ]
        failed = [tp for tp in self._consumer.commit(offsets=wanted, asynchronous=False) or () if tp.error]
        if failed:
            raise KafkaError(f"commit failed for {[(tp.topic, tp.partition, str(tp.error)) for tp in failed]}")

    async def commit_async(self, offsets: Mapping[TopicPartition, Any]) -> None:
        """For the rebalance listener: rebalance callbacks run on the fetch thread, where a blocking commit is fine."""
        self.commit(offsets)

    @_kafka_errors
    def committed(self, partition: TopicPartition, metadata: bool = False) -> int | OffsetAndMetadata | None:
        """The group's committed offset (with ``metadata``: as an ``OffsetAndMetadata``, its metadata too)."""
        tp = self._confluent.TopicPartition(partition.topic, partition.partition)
        (answer,) = self._consumer.committed([tp], timeout=_METADATA_TIMEOUT_S)
        if answer.offset < 0:
            return None
        return OffsetAndMetadata(answer.offset, answer.metadata, -1) if metadata else answer.offset

    def beginning_offsets(self, partitions: Iterable[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return {tp: self._watermarks(tp, timeout_ms)[0] for tp in partitions}

    def end_offsets(self, partitions: Iterable[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return {tp: self._watermarks(tp, timeout_ms)[1] for tp in partitions}

    @_kafka_errors
    def _watermarks(self, partition: TopicPartition, timeout_ms: int) -> tuple[int, int]:
        tp = self._confluent.TopicPartition(partition.topic, partition.partition)
        answer = self._consumer.get_watermark_offsets(tp, timeout=timeout_ms / 1000, cached=False)
        if answer is None:
            raise KafkaError(f"no offsets for {partition} within {timeout_ms} ms")
        return answer

    def highwater(self, partition: TopicPartition) -> int | None:
        """The end offset the last fetch response carried (None before any)."""
        tp = self._confluent.TopicPartition(partition.topic, partition.partition)
        try:
            answer = self._consumer.get_watermark_offsets(tp, cached=True)
        except self._confluent.KafkaException:
            return None
        return answer[1] if answer is not None and answer[1] >= 0 else None

    @_kafka_errors
    def position(self, partition: TopicPartition, timeout_ms: int | None = None) -> int | None:
        """Next offset this consumer hands out (None until it has fetched or been placed)."""
        (answer,) = self._consumer.position([self._confluent.TopicPartition(partition.topic, partition.partition)])
        return answer.offset if answer.offset >= 0 else None

    def close(self, autocommit: bool = False) -> None:
        """Leave the group. Nothing is committed here (auto-commit is off; the source commits first)."""
        self._consumer.close()

    def _partitions(self, partitions: Iterable[TopicPartition]) -> list:
        return [self._confluent.TopicPartition(tp.topic, tp.partition) for tp in partitions]
