"""Open a source from its URL, and the dead-letter sink that goes with it.

Sources are registered by URL scheme in :data:`SOURCES`:

* ``kafka://HOST:PORT/TOPIC``: a :class:`~consumers.kafka.KafkaSource` in a consumer group, through the
  Kafka client named in :data:`KAFKA_CLIENTS`;
* ``file://PATH`` or a plain path: a :class:`~consumers.recorded.RecordedSource` over a recorded-stream file;
* ``synthetic://?records=N&classes=K&dim=D&seed=S``: a :class:`~consumers.synthetic.SyntheticSource`
  (see :class:`~consumers.urls.SyntheticUrl`).

A new kind of source is its module plus one entry here; it must pass ``tests/consumers/test_source_contract.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kafka import KafkaConsumer

from consumers.dlq import FileDeadLetterSink, KafkaDeadLetterSink
from consumers.kafka import KafkaSource, RunOffsets
from consumers.kafka_librdkafka import LibrdkafkaConsumer
from consumers.label_wire import decode_label
from consumers.recorded import RecordedSource
from consumers.source import NextOffsets, Offsets, Source
from consumers.synthetic import SyntheticSource
from consumers.urls import KafkaUrl, SyntheticUrl, is_kafka_url
from consumers.wire import decode_samples

KAFKA_CLIENTS: dict[str, Callable[..., Any]] = {"kafka-python": KafkaConsumer, "librdkafka": LibrdkafkaConsumer}
"""Kafka client name -> consumer class under :class:`~consumers.kafka.KafkaSource` (librdkafka: an extra)."""

_GROUP_TIMINGS = ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms")


@dataclass(frozen=True)
class SourceRequest:
    """What :func:`open_source` was asked for, as every registered opener receives it."""

    url: str
    group: str = "stream-cl"
    start_offsets: Offsets = field(default_factory=dict)
    from_checkpoint: bool = False
    require_topic: bool = False
    kafka_options: Mapping[str, Any] = field(default_factory=dict)
    labels: bool = False
    kafka_client: str = "kafka-python"
    run_offsets: RunOffsets | None = None


def _open_kafka(request: SourceRequest) -> Source:
    url = KafkaUrl.parse(request.url)
    if request.kafka_client not in KAFKA_CLIENTS:
        raise ValueError(f"unknown Kafka client {request.kafka_client!r}; use one of {', '.join(KAFKA_CLIENTS)}")
    options = dict(request.kafka_options)
    timings = {name: options.pop(name) for name in _GROUP_TIMINGS if name in options}
    timings.setdefault("session_timeout_ms", 10000)
    timings.setdefault("heartbeat_interval_ms", max(1, timings["session_timeout_ms"] // 4))
    return KafkaSource(
        url.bootstrap,
        url.topic,
        request.group,
        start_offsets=request.start_offsets,
        from_checkpoint=request.from_checkpoint,
        require_topic=request.require_topic,
        client_options=options,
        decoder=decode_label if request.labels else decode_samples,
        consumer_class=KAFKA_CLIENTS[request.kafka_client],
        run_offsets=request.run_offsets,
        **timings,
    )


def _open_file(request: SourceRequest) -> Source:
    _no_labels(request)
    path = request.url.removeprefix("file://")
    return RecordedSource(Path(path), start_offsets=request.start_offsets)


def _open_synthetic(request: SourceRequest) -> Source:
    _no_labels(request)
    url = SyntheticUrl.parse(request.url)
    return SyntheticSource(
        url.records,
        dim=url.dim,
        n_classes=url.classes,
        seed=url.seed,
        stream=url.stream,
        start_offsets=request.start_offsets,
    )


def _no_labels(request: SourceRequest) -> None:
    if request.labels:
        raise ValueError(f"label messages are read from Kafka only, not {request.url!r}")


SOURCES: dict[str, Callable[[SourceRequest], Source]] = {
    "kafka": _open_kafka,
    "file": _open_file,
    "synthetic": _open_synthetic,
}
"""URL scheme -> opener. A URL without ``://`` is a file path."""


def source_scheme(url: str) -> str:
    """The registry key of ``url``: its scheme, or ``file`` for a plain path.

    >>> source_scheme("kafka://127.0.0.1:9092/images"), source_scheme("data/stream.rec.gz")
    ('kafka', 'file')
    """
    if "://" not in url:
        return "file"
    return urlsplit(url).scheme or url.split("://", 1)[0]


def open_source(
    url: str,
    *,
    group: str = "stream-cl",
    start_offsets: Offsets | None = None,
    from_checkpoint: bool = False,
    require_topic: bool = False,
    kafka_options: Mapping[str, Any] | None = None,
    labels: bool = False,
    kafka_client: str = "kafka-python",
    run_offsets: RunOffsets | None = None,
) -> Source:
    """The source named by ``url``, starting at ``start_offsets`` where given.

    ``group`` is the Kafka consumer group. ``from_checkpoint`` says ``start_offsets`` come from a model
    checkpoint: they then decide where every partition starts (one they lack starts at its earliest record),
    and a Kafka source commits them once assigned, so the group agrees with the model. ``require_topic``
    makes a missing Kafka topic an error at once instead of a wait. ``kafka_options`` are kafka-python client
    settings (``security_protocol``, ``sasl_*``, ``ssl_*``, ``session_timeout_ms``, ``heartbeat_interval_ms``;
    heartbeats default to a quarter of the session timeout, which defaults to 10 s). ``labels`` reads label
    messages (:mod:`consumers.label_wire`) instead of feature records. ``kafka_client`` names the client in
    :data:`KAFKA_CLIENTS` (``librdkafka`` needs the ``librdkafka`` extra; the settings keep kafka-python's names).
    ``run_offsets`` are shared by the Kafka consumers of one run of a model (:class:`consumers.kafka.RunOffsets`).

    Raises
    ------
    ValueError
        For a URL whose scheme is not registered (the message names those that are), or a malformed URL.

    Examples
    --------
    >>> with open_source("synthetic://?records=3&classes=2&dim=4") as source:
    ...     len(source.poll(0.0, 10)), source.exhausted
    (3, True)
    """
    scheme = source_scheme(url)
    if scheme not in SOURCES:
        raise ValueError(f"unknown source {url!r}; use one of {', '.join(f'{s}://' for s in SOURCES)} or a path")
    request = SourceRequest(
        url,
        group=group,
        start_offsets=NextOffsets(start_offsets),  # keeps a checkpoint's samples within a message
        from_checkpoint=from_checkpoint,
        require_topic=require_topic,
        kafka_options=dict(kafka_options or {}),
        labels=labels,
        kafka_client=kafka_client,
        run_offsets=run_offsets,
    )
    return SOURCES[scheme](request)


def open_dead_letters(
    url: str,
    *,
    dead_letter_out: str | Path | None = None,
    dead_letter_topic: str | None = None,
    client_options: Mapping[str, Any] | None = None,
    spool_dir: str | Path | None = None,
) -> FileDeadLetterSink | KafkaDeadLetterSink | None:
    """Where the dead letters of source ``url`` go.

    ``dead_letter_out`` (a recorded-stream file) wins; else a Kafka source's go to ``dead_letter_topic``
    (default ``TOPIC.dlq``) through the on-disk spool ``spool_dir`` (what a crash left there is sent on
    the next start); those of other sources are only counted (None).
    """
    if dead_letter_out:
        return FileDeadLetterSink(dead_letter_out)
    if not is_kafka_url(url):
        return None
    return KafkaDeadLetterSink(
        KafkaUrl.parse(url).bootstrap, topic=dead_letter_topic, client_options=client_options, spool_dir=spool_dir
    )
