"""Predictions out: one JSON record per predicted input, to a Kafka topic or a JSON-lines file.

A prediction record is ``{"id", "predicted": [class per level], "confidence": [per level],
"model_version": checkpoint id, "latency_ms": poll-to-publish time, "learned": bool,
"topic", "partition", "offset"}``. ``predicted`` is the label path from the coarsest level to the
finest level that has classes; a confidence that is not finite (a model that overflowed) is ``null``,
since NaN and infinity are not JSON; ``model_version`` is the id of the newest checkpoint written (or
restored) when the prediction was made, 0 before the first one.

An output that fails never stops the learner: a record the output refuses or never acknowledges is lost
and counted in ``streamcl_predictions_failed_total{reason}``; ``streamcl_predictions_total`` counts only
the records the output took (acknowledged by the broker, or written to the file).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from consumers.record import Record
from monitoring.metrics import Metrics
from stream_cl.errors import ConfigError
from stream_cl.labels import LabelTree
from stream_cl.learner import Prediction

log = logging.getLogger(__name__)

WHICH = ("unlabelled", "all")
RETRY_S = 10.0
"""After the output raised on a send, records are dropped untried for this long: a Kafka producer without
the topic's metadata blocks ``max_block_ms`` on every send, which would stall the learner for each record."""
LOG_EVERY_S = 60.0
"""Lost predictions are logged at most once per this interval (with how many were lost since)."""
MAX_BLOCK_MS = 1000
"""Longest a Kafka ``send`` blocks the learner for topic metadata or buffer space (kafka-python's default: 60 s)."""
CLOSE_TIMEOUT_S = 5.0
"""Longest closing the Kafka output waits for unacknowledged records (a drain must end within ``--drain-timeout``)."""
CHECK_PATH_S = 1.0
"""The file output checks at most this often whether its path still names the file it writes (rotation)."""


class Sink(Protocol):
    """Where encoded prediction records go, keyed by record id.

    ``send`` raises if the record cannot be handed over; otherwise it calls ``acknowledged()`` once the record
    is out or ``lost(error)`` if it never will be, perhaps later and on another thread.
    """

    def send(
        self, key: bytes, value: bytes, acknowledged: Callable[..., None], lost: Callable[[BaseException], None]
    ) -> None: ...

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
        Receives ``streamcl_predictions_total`` and ``streamcl_predictions_failed_total``.
    retry_s
        After a failed send, records are dropped untried (``backing_off``) for this long.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        which: str = "unlabelled",
        version: Callable[[], int],
        metrics: Metrics | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        if which not in WHICH:
            raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
        self.sink = sink
        self.which = which
        self.version = version
        self.metrics = metrics
        self.retry_s = retry_s
        self._retry_at = 0.0
        self._lost_lock = threading.Lock()  # losses are reported by the learner and by the Kafka I/O thread
        self._unlogged: Counter[str] = Counter()
        self._log_at = 0.0

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
                "confidence": [conf if math.isfinite(conf) else None for _, conf in paths[i]],
                "model_version": version,
                "latency_ms": latency_ms,
                "learned": record.label is not None,
                "topic": record.position.stream,
                "partition": record.position.partition,
                "offset": record.position.offset,
            }
            self._send(record.id.encode(), json.dumps(body, separators=(",", ":"), allow_nan=False).encode())

    def close(self) -> None:
        self.sink.close()

    def _send(self, key: bytes, value: bytes) -> None:
        """Hand one record to the output; never raises: a failure is counted, logged and backed off from."""
        if time.monotonic() < self._retry_at:
            self._count_loss("backing_off", None)
            return
        try:
            self.sink.send(key, value, self._acknowledged, self._lost)
        except Exception as err:  # the learner must outlive any output failure
            self._retry_at = time.monotonic() + self.retry_s  # from the end of the failed send (it may have blocked)
            self._count_loss("send_failed", err)

    def _acknowledged(self, _metadata: object = None) -> None:
        if self.metrics is not None:
            self.metrics.predictions.inc()

    def _lost(self, error: BaseException) -> None:
        self._count_loss("delivery_failed", error)

    def _count_loss(self, reason: str, error: BaseException | None) -> None:
        if self.metrics is not None:
            self.metrics.predictions_failed.labels(reason=reason).inc()
        now = time.monotonic()
        with self._lost_lock:
            self._unlogged[reason] += 1
            if error is None or now < self._log_at:
                return
            self._log_at = now + LOG_EVERY_S
            lost, self._unlogged = dict(self._unlogged), Counter()
        log.warning("predictions are lost (%s since the last such message): %s", _counts(lost), error)


class FileSink:
    """Appends one JSON line per prediction to a file.

    Unbuffered: each line is one ``write`` call, so a crash never leaves a published prediction in
    a process buffer. A line is in the file whole or not at all: a write the disk takes only in part (full,
    or past the file size limit) is cut back to the last whole line and raises, so the record counts as lost.
    Like :class:`logging.handlers.WatchedFileHandler`, the sink checks at most every :data:`CHECK_PATH_S`
    whether its path still names the file it writes, and opens a new file there when the old one was moved
    away (rotated) or deleted.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._open()

    def send(
        self, key: bytes, value: bytes, acknowledged: Callable[..., None], lost: Callable[[BaseException], None]
    ) -> None:
        if time.monotonic() >= self._check_at:  # a clock read per record, a stat per second
            self._reopen_if_moved()
        self._write(value + b"\n")
        acknowledged()

    def close(self) -> None:
        self._file.close()

    def _open(self) -> None:
        self._file = self.path.open("ab", buffering=0)
        status = os.fstat(self._file.fileno())
        self._identity = (status.st_dev, status.st_ino)
        self._check_at = time.monotonic() + CHECK_PATH_S

    def _reopen_if_moved(self) -> None:
        self._check_at = time.monotonic() + CHECK_PATH_S
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            status = None
        if status is not None and (status.st_dev, status.st_ino) == self._identity:
            return
        log.info("predictions file %s was moved or deleted; writing a new one there", self.path)
        old = self._file
        self._open()
        old.close()

    def _write(self, line: bytes) -> None:
        """Write all of ``line``; on failure remove the part written, so the next line starts on a line of its own."""
        written = 0
        try:
            while written < len(line):
                n = self._file.write(memoryview(line)[written:])
                if not n:
                    raise OSError(f"predictions file {self.path}: short write, {written} of {len(line)} bytes")
                written += n
        except OSError:
            if written:
                self._cut_back(written)
            raise

    def _cut_back(self, written: int) -> None:
        """Truncate the file by the ``written`` bytes of a line that could not be finished."""
        try:
            os.ftruncate(self._file.fileno(), os.fstat(self._file.fileno()).st_size - written)
        except OSError as err:
            log.error("predictions file %s keeps a partial line: %s", self.path, err)


class KafkaSink:
    """Produces prediction records to a Kafka topic (value: JSON, key: record id).

    ``send`` runs on the learner's thread: it blocks at most ``max_block_ms`` (no metadata for the topic yet,
    or the producer's buffer full) and then raises. ``close`` waits at most ``close_timeout_s`` for records
    not yet acknowledged.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        max_block_ms: int = MAX_BLOCK_MS,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        **client: object,
    ) -> None:
        from consumers.producer import new_producer  # imported here: file outputs need no Kafka client

        self.topic = topic
        self.close_timeout_s = close_timeout_s
        self._producer = new_producer(bootstrap, max_block_ms=max_block_ms, **client)

    def send(
        self, key: bytes, value: bytes, acknowledged: Callable[..., None], lost: Callable[[BaseException], None]
    ) -> None:
        self._producer.send(self.topic, key=key, value=value).add_callback(acknowledged).add_errback(lost)

    def close(self) -> None:
        try:
            self._producer.close(timeout=self.close_timeout_s)
        except Exception as err:  # KafkaTimeoutError: records the broker has not acknowledged are left behind
            log.warning("predictions to %s not all delivered at close: %s", self.topic, err)


def open_sink(url: str, **kafka_client: object) -> Sink:
    """``kafka://HOST:PORT/TOPIC`` → :class:`KafkaSink`; ``file:PATH`` or a plain path → :class:`FileSink`."""
    if url.startswith("kafka://"):
        host, _, topic = url.removeprefix("kafka://").partition("/")
        if not host or not topic:
            raise ConfigError(f"predictions URL must be kafka://HOST:PORT/TOPIC, got {url!r}")
        return KafkaSink(host, topic, **kafka_client)
    return FileSink(url.removeprefix("file:"))


def _counts(lost: dict[str, int]) -> str:
    """``{"send_failed": 1, "backing_off": 40}`` → ``1 send_failed, 40 backing_off``."""
    return ", ".join(f"{n} {reason}" for reason, n in lost.items())
