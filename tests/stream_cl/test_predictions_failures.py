"""A failing predictions output never stops the learner, and the metrics say what was delivered and what lost."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka.errors import KafkaTimeoutError, RequestTimedOutError
from kafka.future import Future
from prometheus_client import CollectorRegistry

from consumers.record import Message, Position, Record
from monitoring.metrics import Metrics
from stream_cl.labels import LabelTree
from stream_cl.learner import Prediction
from stream_cl.predictions import MAX_BLOCK_MS, FileSink, KafkaSink, Predictions
from tests.fixtures.kafka import RestartableBroker

FAST_CLIENT = {"reconnect_backoff_ms": 50, "reconnect_backoff_max_ms": 200}
SLACK_S = 2.0
"""What a loaded test machine may add to a bound."""


class FakeProducer:
    """kafka-python's producer as the sink uses it: ``send`` raises ``error`` or returns a pending future."""

    def __init__(self, **config: object) -> None:
        self.config = config
        self.error: Exception | None = None
        self.futures: list[Future] = []
        self.closed_with: float | None = None

    def send(self, topic: str, key: bytes, value: bytes) -> Future:
        if self.error is not None:
            raise self.error
        self.futures.append(Future())
        return self.futures[-1]

    def close(self, timeout: float | None = None) -> None:
        self.closed_with = timeout
        raise KafkaTimeoutError("records not acknowledged")


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> FakeProducer:
    """The producer the next :class:`KafkaSink` gets (no broker needed)."""
    fake = FakeProducer()

    def new_producer(bootstrap: str, **config: object) -> FakeProducer:
        fake.config = config
        return fake

    monkeypatch.setattr("consumers.producer.new_producer", new_producer)
    return fake


def batch(n: int) -> tuple[list[Record], Prediction, LabelTree]:
    """``n`` unlabelled records and the model's prediction for them (class ``a``)."""
    tree = LabelTree()
    tree.encode([("a",)])
    records = []
    for i in range(n):
        message = Message(Position("in", 0, i), 0.0, None, b"")
        records.append(Record(f"r{i}", np.zeros(2, np.float32), None, message.position, 0.0, message))
    return records, Prediction(torch.zeros(n, 1, dtype=torch.long), torch.full((n, 1), 0.9)), tree


def publish(predictions: Predictions, n: int) -> None:
    records, prediction, tree = batch(n)
    predictions.publish(records, prediction, tree, time.monotonic())


def counts(metrics: Metrics) -> dict[str, float]:
    """``streamcl_predictions_total`` and ``streamcl_predictions_failed_total`` by reason."""
    out = {"delivered": metrics.registry.get_sample_value("streamcl_predictions_total")}
    for reason in ("send_failed", "backing_off", "delivery_failed"):
        out[reason] = metrics.registry.get_sample_value("streamcl_predictions_failed_total", {"reason": reason})
    return out


def test_a_send_that_raises_is_counted_and_backed_off_from_not_raised(producer: FakeProducer) -> None:
    metrics = Metrics(CollectorRegistry())
    predictions = Predictions(KafkaSink("broker:9092", "out"), version=lambda: 0, metrics=metrics, retry_s=60)
    assert producer.config["max_block_ms"] == MAX_BLOCK_MS <= 1000  # not kafka-python's 60 s
    producer.error = KafkaTimeoutError("Failed to update metadata after 1.0 secs.")
    publish(predictions, 5)  # the first send raises; the other 4 are not tried while it backs off
    assert counts(metrics) == {"delivered": 0, "send_failed": 1, "backing_off": 4, "delivery_failed": 0}
    predictions.retry_s = predictions._retry_at = 0.0  # the back-off is over
    producer.error = None
    publish(predictions, 2)
    assert len(producer.futures) == 2


def test_deliveries_count_when_acknowledged_and_failures_through_the_errback(producer: FakeProducer) -> None:
    metrics = Metrics(CollectorRegistry())
    predictions = Predictions(KafkaSink("broker:9092", "out"), version=lambda: 0, metrics=metrics)
    publish(predictions, 3)
    assert counts(metrics)["delivered"] == 0  # handed to the producer is not delivered
    first, second, third = producer.futures
    first.success(None)
    second.failure(RequestTimedOutError("no answer"))  # the producer's I/O thread gives up on it
    third.success(None)
    assert counts(metrics) == {"delivered": 2, "send_failed": 0, "backing_off": 0, "delivery_failed": 1}


def test_losses_are_logged_at_most_once_a_minute(producer: FakeProducer, caplog: pytest.LogCaptureFixture) -> None:
    predictions = Predictions(KafkaSink("broker:9092", "out"), version=lambda: 0, retry_s=0)
    producer.error = KafkaTimeoutError("no metadata")
    with caplog.at_level(logging.WARNING, logger="stream_cl.predictions"):
        for _ in range(3):
            publish(predictions, 10)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "stream_cl.predictions"]
    assert "1 send_failed" in line and "no metadata" in line


def test_close_is_bounded_and_does_not_raise(producer: FakeProducer) -> None:
    KafkaSink("broker:9092", "out", close_timeout_s=2.5).close()
    assert producer.closed_with == 2.5


def test_a_file_output_counts_written_lines_and_survives_a_write_error(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    predictions = Predictions(FileSink(tmp_path / "p.jsonl"), version=lambda: 0, metrics=metrics)
    publish(predictions, 3)
    assert counts(metrics)["delivered"] == 3 and (tmp_path / "p.jsonl").read_bytes().count(b"\n") == 3
    predictions.sink.close()  # writing now fails (as on a full disk): counted, not raised
    publish(predictions, 2)
    assert counts(metrics) == {"delivered": 3, "send_failed": 1, "backing_off": 1, "delivery_failed": 0}


def test_a_broker_down_before_the_first_prediction_neither_crashes_nor_stalls_the_learner(
    restartable_kafka: RestartableBroker,
) -> None:
    """The producer has no metadata for the topic yet: each send would block ``max_block_ms`` then raise."""
    metrics = Metrics(CollectorRegistry())
    sink = KafkaSink(restartable_kafka.bootstrap, "predictions", close_timeout_s=1.0, **FAST_CLIENT)
    predictions = Predictions(sink, version=lambda: 0, metrics=metrics, retry_s=0.5)
    restartable_kafka.stop()
    started = time.monotonic()
    publish(predictions, 20)
    assert time.monotonic() - started < MAX_BLOCK_MS / 1000 + SLACK_S  # one bounded block, not 20 x 60 s
    assert counts(metrics) == {"delivered": 0, "send_failed": 1, "backing_off": 19, "delivery_failed": 0}
    restartable_kafka.start()
    deadline = time.monotonic() + 60
    while not counts(metrics)["delivered"]:  # delivery resumes once the broker is back
        assert time.monotonic() < deadline, counts(metrics)
        time.sleep(0.5)
        publish(predictions, 1)
    started = time.monotonic()
    predictions.close()
    assert time.monotonic() - started < 1.0 + SLACK_S
