"""``streamcl_dead_letter_rejected_total``: dead letters the broker refuses are counted, not only logged; the
dead-letter gauges cover every sink (the data topic's and, with delayed labels, the label topic's)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from consumers.dlq import FileDeadLetterSink, KafkaDeadLetterSink
from consumers.record import DeadLetter, Message, Position
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from stream_cl.publishing import Publisher

REJECTED = "streamcl_dead_letter_rejected_total"


def publish(publisher: Publisher) -> None:
    publisher.gauges(time.monotonic(), None, PrequentialAccuracy(), source=None)


def rejected(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(REJECTED)


def test_rejections_of_the_sink_are_a_counter_from_0() -> None:
    sink = SimpleNamespace(spooled=0, healthy=True, rejected=0)
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(metrics, [sink])
    assert rejected(metrics) == 0  # from the start, so the first rejection is an increase to Prometheus
    sink.rejected = 2
    publish(publisher)
    assert rejected(metrics) == 2
    publish(publisher)
    sink.rejected = 3
    publish(publisher)
    assert rejected(metrics) == 3


def test_the_gauges_cover_the_label_topics_sink_too() -> None:
    """With delayed labels a second sink takes the label topic's dead letters: its spool, health and rejections
    were never published, so a backed-up label sink raised no alert."""
    data, labels = (SimpleNamespace(spooled=0, healthy=True, rejected=0) for _ in range(2))
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(metrics, [data, labels])
    labels.spooled, labels.healthy, labels.rejected = 7, False, 1
    publish(publisher)
    value = metrics.registry.get_sample_value
    assert (value("streamcl_dead_letter_spool_records"), value("streamcl_dead_letter_sink_up")) == (7, 0)
    assert rejected(metrics) == 1


def test_no_spooling_sink_no_series(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    publish(Publisher(metrics))
    assert rejected(metrics) is None
    with FileDeadLetterSink(tmp_path / "dead.rec.gz") as sink:  # it spools nothing, rejects nothing
        publish(Publisher(metrics, [sink]))
    assert rejected(metrics) == 0


def test_a_dead_letter_too_large_for_the_broker_is_counted(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic, spool = f"t-{uuid.uuid4().hex[:10]}", tmp_path / "spool"
    huge = DeadLetter(Message(Position(topic, 0, 1), 0.0, None, b"x" * 5000), "oversized")
    small = DeadLetter(Message(Position(topic, 0, 2), 0.0, None, b"x"), "bad_json")
    metrics = Metrics(CollectorRegistry())
    sink = KafkaDeadLetterSink(
        kafka_bootstrap, spool_dir=spool, timeout_s=3.0, client_options={"max_request_size": 2000}
    )
    with sink:
        publisher = Publisher(metrics, [sink])
        for dead in (huge, small):
            sink.send(dead)
        deadline = time.monotonic() + 30
        while sink.spooled and time.monotonic() < deadline:
            time.sleep(0.05)
        publish(publisher)
        assert metrics.registry.get_sample_value("streamcl_dead_letter_sink_up") == 1  # the sink itself is fine
    assert rejected(metrics) == 1 and sink.delivered == 1
    assert len(list(spool.glob("*.rejected"))) == 1
