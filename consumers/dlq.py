"""Dead-letter sinks: where records that cannot be learned go, whole, with the reason why.

A dead letter keeps the original key, value and headers byte for byte and adds headers
``reason`` (one of :data:`consumers.wire.REASONS` or the run loop's reasons), ``detail`` (a short
explanation) and ``source-topic`` / ``source-partition`` / ``source-offset`` (where it was read).
Both sinks implement the run loop's ``DeadLetterSink`` protocol (``send(dead)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumers.producer import new_producer
from consumers.record import DeadLetter, Message
from consumers.recorded import RecordedWriter

DLQ_SUFFIX = ".dlq"
_MAX_DETAIL = 500


def dead_letter_headers(dead: DeadLetter) -> tuple[tuple[str, bytes], ...]:
    """Original headers plus ``reason``, ``detail`` and the source position.

    >>> from consumers.record import Position
    >>> m = Message(Position("images", 2, 7), 0.0, b"k", b"{", (("content-type", b"application/json"),))
    >>> [k for k, _ in dead_letter_headers(DeadLetter(m, "bad_json", "Expecting value"))]
    ['content-type', 'reason', 'detail', 'source-topic', 'source-partition', 'source-offset']
    """
    pos = dead.message.position
    return (
        *dead.message.headers,
        ("reason", dead.reason.encode()),
        ("detail", dead.detail[:_MAX_DETAIL].encode()),
        ("source-topic", pos.stream.encode()),
        ("source-partition", str(pos.partition).encode()),
        ("source-offset", str(pos.offset).encode()),
    )


class KafkaDeadLetterSink:
    """Produce dead letters to ``topic``, or to ``<source topic>.dlq`` when ``topic`` is None.

    ``send`` returns only once the broker has acknowledged the dead letter, so the run loop's commit
    (which follows the sends of its batch) never moves past a record whose dead letter could still be lost.
    Dead letters are rare, so one round trip each is cheap.

    Raises
    ------
    ConnectionError
        From ``send`` when the broker does not acknowledge within ``timeout_s`` (the batch is then not
        committed, and is read again after a restart).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str | None = None,
        timeout_s: float = 10.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.timeout_s = timeout_s
        self.sent = 0
        self._producer = new_producer(bootstrap, linger_ms=0, **dict(client_options or {}))

    def send(self, dead: DeadLetter) -> None:
        topic = self.topic or dead.message.position.stream + DLQ_SUFFIX
        future = self._producer.send(
            topic, value=dead.message.value, key=dead.message.key, headers=list(dead_letter_headers(dead))
        )
        try:
            future.get(timeout=self.timeout_s)
        except Exception as err:  # kafka-python raises KafkaError subclasses and plain timeouts here
            raise ConnectionError(f"dead letter to {topic} not acknowledged: {err}") from err
        self.sent += 1

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> KafkaDeadLetterSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileDeadLetterSink:
    """Write dead letters to a recorded-stream file (original positions, added headers as above)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer = RecordedWriter(self.path)

    @property
    def sent(self) -> int:
        return self._writer.count

    def send(self, dead: DeadLetter) -> None:
        m = dead.message
        self._writer.write(Message(m.position, m.timestamp, m.key, m.value, dead_letter_headers(dead)))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> FileDeadLetterSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
