"""Record a Kafka topic, every partition from its beginning, into a recorded-stream file (``stream-cl record``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from consumers.kafka import TopicNotFoundError, message_from_record, unreadable_records
from consumers.recorded import RecordedWriter

log = logging.getLogger("consumers.capture")


def record_topic(
    bootstrap: str,
    topic: str,
    path: str | Path,
    *,
    until_idle_s: float | None = 5.0,
    metadata_timeout_s: float = 10.0,
    client_options: Mapping[str, Any] | None = None,
) -> int:
    """Copy ``topic`` into ``path`` byte for byte (keys, values, headers, timestamps, partitions, offsets).

    Reads without a consumer group (nothing is committed). Stops once no message arrived for
    ``until_idle_s`` seconds; ``None`` records until interrupted (Ctrl-C still closes the file cleanly).
    Messages of different partitions interleave in arrival order; each partition's order is kept.
    Returns the number of messages written. Records the Kafka client cannot read (see
    :mod:`consumers.kafka`) cannot be copied: they are left out, with a warning naming their offsets.

    Raises
    ------
    TopicNotFoundError
        If ``topic`` does not exist on the broker (checked without creating it).
    """
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            client_id="stream-cl-record",
            **(client_options or {}),
        )
    except KafkaError as err:
        raise ConnectionError(f"cannot reach Kafka at {bootstrap}: {err}") from err
    try:
        partitions = _partitions(consumer, bootstrap, topic, metadata_timeout_s)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        with RecordedWriter(path) as writer:
            last = time.monotonic()
            try:
                while until_idle_s is None or time.monotonic() - last < until_idle_s:
                    batch = _poll(consumer)
                    if batch:
                        last = time.monotonic()
                    for tp in sorted(batch):
                        for record in batch[tp]:
                            writer.write(message_from_record(record))
            except KeyboardInterrupt:
                pass
            return writer.count
    finally:
        consumer.close(autocommit=False)


def _poll(consumer: KafkaConsumer) -> dict:
    """``consumer.poll``, moving a partition past records the client cannot read (without the seek, kafka-python
    would spin on its dead record reader for good)."""
    try:
        return consumer.poll(timeout_ms=200)
    except Exception as err:
        found = unreadable_records(err, consumer.config["max_poll_records"])
        if found is None:
            raise
        tp, records = found
        first, last = records[0].offset, records[-1].offset
        log.warning("%s: offsets %d-%d cannot be read and are not recorded: %s", tp, first, last, err)
        consumer.seek(tp, records[-1].offset + 1)
        return {}


def _partitions(consumer: KafkaConsumer, bootstrap: str, topic: str, timeout_s: float) -> list[TopicPartition]:
    # Listing all topics creates none, unlike a metadata request naming the topic on some brokers.
    if topic not in consumer.topics():
        raise TopicNotFoundError(topic, bootstrap)
    deadline = time.monotonic() + timeout_s
    while not (ids := consumer.partitions_for_topic(topic)):  # the topic's metadata may still be on its way
        if time.monotonic() > deadline:
            raise TopicNotFoundError(topic, bootstrap)
        time.sleep(0.1)
    return [TopicPartition(topic, p) for p in sorted(ids)]
