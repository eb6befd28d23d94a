"""Record a Kafka topic, every partition from its beginning, into a recorded-stream file (``stream-cl record``)."""

from __future__ import annotations

import logging
import threading
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
    stop: threading.Event | None = None,
) -> int:
    """Copy ``topic`` into ``path`` byte for byte (keys, values, headers, timestamps, partitions, offsets).

    A null value (a tombstone) or header value is written as empty bytes, as a run reads it live (see
    :func:`~consumers.kafka.message_from_record`), so a recording learns as the topic does; a null key stays null.

    Reads without a consumer group (nothing is committed). Stops once no message arrived for
    ``until_idle_s`` seconds and every partition is read to its end offset; ``None`` records until interrupted
    (Ctrl-C, or ``stop`` set, e.g. by a SIGTERM handler, still closes the file cleanly).
    Messages of different partitions interleave in arrival order; each partition's order is kept.
    Returns the number of messages written. Records the Kafka client cannot read (see
    :mod:`consumers.kafka`) cannot be copied: they are left out, with a warning naming their offsets.

    Raises
    ------
    TopicNotFoundError
        If ``topic`` does not exist on the broker (checked without creating it).
    ConnectionError
        If the broker went away, or stopped delivering, before the end of the topic: what was recorded is in
        the (cleanly closed) file, but it is not the whole topic.
    """
    stop = stop or threading.Event()
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # retention deleted unread records: keep the rest, not jump to the end
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
            try:
                _copy(consumer, partitions, writer, until_idle_s, stop, bootstrap, metadata_timeout_s)
            except KeyboardInterrupt:
                pass
            except (ConnectionError, KafkaError) as err:
                raise ConnectionError(f"{topic} recorded in part ({writer.count} messages in {path}): {err}") from err
            except OSError as err:  # the disk is full, say: the frames written before it still read
                raise OSError(err.errno, f"{path}: {err.strerror} after {writer.count} messages") from err
            return writer.count
    except KafkaError as err:  # finding the topic's partitions failed: nothing was recorded
        raise ConnectionError(f"cannot read {topic} from Kafka at {bootstrap}: {err}") from err
    finally:
        consumer.close(autocommit=False)


def _copy(
    consumer: KafkaConsumer,
    partitions: list[TopicPartition],
    writer: RecordedWriter,
    until_idle_s: float | None,
    stop: threading.Event,
    bootstrap: str,
    timeout_s: float,
) -> None:
    """Write what arrives until ``stop`` is set, or until idle with every partition read to its end offset."""
    last = time.monotonic()
    behind: dict[TopicPartition, tuple[int, int]] = {}
    while not stop.is_set():
        if until_idle_s is not None and time.monotonic() - last >= until_idle_s:
            # idle is the end only where the broker says so: a broker gone quiet is not an empty topic
            was_behind, behind = behind, _behind(consumer, partitions, bootstrap, timeout_s)
            if not behind:
                return
            if behind == was_behind:  # a whole idle period more without a message
                raise ConnectionError(f"Kafka at {bootstrap} stopped delivering {_gaps(behind)}")
            last = time.monotonic()
        batch = _poll(consumer)
        if batch:
            last = time.monotonic()
        for tp in sorted(batch):
            for record in batch[tp]:
                writer.write(message_from_record(record))


def _behind(
    consumer: KafkaConsumer, partitions: list[TopicPartition], bootstrap: str, timeout_s: float
) -> dict[TopicPartition, tuple[int, int]]:
    """The partitions not read to their end offset yet, each with (position, end offset)."""
    try:
        ends = consumer.end_offsets(partitions, timeout_ms=timeout_s * 1000)
        positions = {tp: consumer.position(tp, timeout_ms=timeout_s * 1000) or 0 for tp in partitions}
    except KafkaError as err:
        raise ConnectionError(f"cannot reach Kafka at {bootstrap} to find the end of the topic: {err}") from err
    return {tp: (positions[tp], ends[tp]) for tp in partitions if positions[tp] < ends[tp]}


def _gaps(behind: dict[TopicPartition, tuple[int, int]]) -> str:
    return ", ".join(f"{tp.topic}-{tp.partition} at offset {at} of {end}" for tp, (at, end) in sorted(behind.items()))


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
