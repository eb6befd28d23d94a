"""Open a ``--source`` (a Kafka topic or a recorded-stream file) and its dead-letter sink, for ``run`` and ``serve``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumers.dlq import FileDeadLetterSink
from consumers.recorded import RecordedSource
from consumers.source import Offsets, Source
from consumers.urls import KafkaUrl, is_kafka_url
from stream_cl.run import DeadLetterSink


def open_source(
    spec: str,
    *,
    group: str = "stream-cl",
    start_offsets: Offsets | None = None,
    session_timeout_ms: int = 10000,
    heartbeat_interval_ms: int | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> Source:
    """The source named by ``spec``, starting at ``start_offsets`` where given.

    ``kafka://HOST:PORT/TOPIC`` gives a :class:`~consumers.kafka.KafkaSource` in consumer group ``group``
    (heartbeats default to a quarter of the session timeout; ``client_options`` carry SASL/TLS settings);
    anything else is a recorded-stream file.
    """
    if not is_kafka_url(spec):
        return RecordedSource(Path(spec), start_offsets=start_offsets)
    from consumers.kafka import KafkaSource  # here: file sources need no Kafka client

    url = KafkaUrl.parse(spec)
    return KafkaSource(
        url.bootstrap,
        url.topic,
        group,
        start_offsets=start_offsets,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms or max(1, session_timeout_ms // 4),
        client_options=client_options,
    )


def open_dead_letters(
    spec: str,
    *,
    dead_letter_out: str | Path | None = None,
    dead_letter_topic: str | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> DeadLetterSink | None:
    """Where the dead letters of source ``spec`` go.

    ``dead_letter_out`` (a recorded-stream file) wins; else a Kafka source's go to ``dead_letter_topic``
    (default ``TOPIC.dlq``); a file source's are only counted (None).
    """
    if dead_letter_out:
        return FileDeadLetterSink(dead_letter_out)
    if not is_kafka_url(spec):
        return None
    from consumers.dlq import KafkaDeadLetterSink

    url = KafkaUrl.parse(spec)
    return KafkaDeadLetterSink(url.bootstrap, topic=dead_letter_topic, client_options=client_options)
