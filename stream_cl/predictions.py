"""Predictions out: one JSON record per predicted input, to a Kafka topic or a JSON-lines file.

A prediction record is ``{"id", "predicted": [class per level], "confidence": [per level],
"model_version": checkpoint id, "latency_ms": poll-to-publish time, "learned": bool,
"topic", "partition", "offset"}``. ``predicted`` is the label path from the coarsest level to the
finest level that has classes; ``model_version`` is the id of the newest checkpoint written (or
restored) when the prediction was made, 0 before the first one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from consumers.record import Record
from monitoring.metrics import Metrics
from stream_cl.errors import ConfigError
from stream_cl.labels import LabelTree
from stream_cl.learner import Prediction

WHICH = ("unlabelled", "all")


class Sink(Protocol):
    """Where encoded prediction records go, keyed by record id."""

    def send(self, key: bytes, value: bytes) -> None: ...

    def close(self) -> None: ...


class Predictions:
    """Formats and publishes the predictions of the records it is told to cover.

    Parameters
    ----------
    sink
        Output (Kafka topic or file).
    which
        ``"unlabelled"`` (records to be predicted) or ``"all"`` (every learned or predicted record).
    version
        Returns the current model version (checkpoint id).
    metrics
        Receives ``streamcl_predictions_total``.
    """

    def __init__(
        self, sink: Sink, *, which: str = "unlabelled", version: Callable[[], int], metrics: Metrics | None = None
    ) -> None:
        if which not in WHICH:
            raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
        self.sink = sink
        self.which = which
        self.version = version
        self.metrics = metrics

    def publish(self, records: list[Record], prediction: Prediction, tree: LabelTree, polled_at: float) -> None:
        """Publish the predictions made for ``records`` (in order) from a batch polled at ``polled_at``."""
        chosen = [i for i, r in enumerate(records) if self.which == "all" or r.label is None]
        if not chosen:
            return
        paths = prediction.paths(tree)
        version = self.version()
        latency_ms = round((time.monotonic() - polled_at) * 1000, 3)
        for i in chosen:
            record = records[i]
            body = {
                "id": record.id,
                "predicted": [name for name, _ in paths[i]],
                "confidence": [conf for _, conf in paths[i]],
                "model_version": version,
                "latency_ms": latency_ms,
                "learned": record.label is not None,
                "topic": record.position.stream,
                "partition": record.position.partition,
                "offset": record.position.offset,
            }
            self.sink.send(record.id.encode(), json.dumps(body, separators=(",", ":")).encode())
        if self.metrics is not None:
            self.metrics.predictions.inc(len(chosen))

    def close(self) -> None:
        self.sink.close()


class FileSink:
    """Appends one JSON line per prediction to a file.

    Unbuffered: each line is one ``write`` call, so a crash never leaves a published prediction in
    a process buffer or half a line in the file.
    """

    def __init__(self, path: str | Path) -> None:
        self._file = Path(path).open("ab", buffering=0)  # noqa: SIM115 - closed by close()

    def send(self, key: bytes, value: bytes) -> None:
        self._file.write(value + b"\n")

    def close(self) -> None:
        self._file.close()


class KafkaSink:
    """Produces prediction records to a Kafka topic (value: JSON, key: record id)."""

    def __init__(self, bootstrap: str, topic: str, **client: object) -> None:
        from consumers.producer import new_producer  # imported here: file outputs need no Kafka client

        self.topic = topic
        self._producer = new_producer(bootstrap, **client)

    def send(self, key: bytes, value: bytes) -> None:
        self._producer.send(self.topic, key=key, value=value)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()


def open_sink(url: str, **kafka_client: object) -> Sink:
    """``kafka://HOST:PORT/TOPIC`` → :class:`KafkaSink`; ``file:PATH`` or a plain path → :class:`FileSink`."""
    if url.startswith("kafka://"):
        host, _, topic = url.removeprefix("kafka://").partition("/")
        if not host or not topic:
            raise ConfigError(f"predictions URL must be kafka://HOST:PORT/TOPIC, got {url!r}")
        return KafkaSink(host, topic, **kafka_client)
    return FileSink(url.removeprefix("file:"))
