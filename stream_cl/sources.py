"""Open the ``--source`` of ``stream-cl run``: a Kafka topic or a recorded-stream file, with its dead-letter sink."""

from __future__ import annotations

from pathlib import Path

from consumers.dlq import FileDeadLetterSink, KafkaDeadLetterSink
from consumers.kafka import KafkaSource
from consumers.recorded import RecordedSource
from consumers.source import Source
from consumers.urls import KafkaUrl, is_kafka_url
from stream_cl.run import DeadLetterSink


def open_source(
    spec: str,
    *,
    group: str = "stream-cl",
    session_timeout_ms: int = 10000,
    dead_letter_out: str | Path | None = None,
    dead_letter_topic: str | None = None,
) -> tuple[Source, DeadLetterSink | None]:
    """The source named by ``spec`` and where its dead letters go.

    ``kafka://HOST:PORT/TOPIC`` gives a :class:`KafkaSource` in ``group`` whose dead letters go to
    ``dead_letter_topic`` (default ``TOPIC.dlq``); anything else is a recorded-stream file whose dead letters
    are only counted. ``dead_letter_out`` writes dead letters to a recorded-stream file instead, for either.
    """
    file_sink = FileDeadLetterSink(dead_letter_out) if dead_letter_out else None
    if not is_kafka_url(spec):
        return RecordedSource(Path(spec)), file_sink
    url = KafkaUrl.parse(spec)
    source = KafkaSource(
        url.bootstrap,
        url.topic,
        group,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(1, session_timeout_ms // 4),
    )
    if file_sink is not None:
        return source, file_sink
    try:
        return source, KafkaDeadLetterSink(url.bootstrap, topic=dead_letter_topic)
    except ConnectionError:
        source.close()
        raise
