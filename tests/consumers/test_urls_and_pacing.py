from __future__ import annotations

import pytest

from consumers.kafka import KafkaSource
from consumers.producer import paced
from consumers.record import Message, Position
from consumers.urls import KafkaUrl


def test_kafka_url() -> None:
    url = KafkaUrl.parse("kafka://broker.local:19092/images.v2")
    assert (url.bootstrap, url.topic, str(url)) == (
        "broker.local:19092",
        "images.v2",
        "kafka://broker.local:19092/images.v2",
    )


@pytest.mark.parametrize(
    "text",
    ["images.rec.gz", "kafka://host/t", "kafka://:9092/t", "kafka://h:99999/t", "kafka://h:1/", "kafka://h:1/a/b"],
)
def test_bad_kafka_urls(text: str) -> None:
    with pytest.raises(ValueError):
        KafkaUrl.parse(text)


def test_paced_waits_by_timestamp_over_speed() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(round(s, 6))
        now[0] += s

    stamps = [50.0, 50.0, 51.0, 50.5, 53.0]  # out-of-order timestamps never wait backwards
    messages = [Message(Position("t", 0, i), ts, None, b"") for i, ts in enumerate(stamps)]
    assert list(paced(messages, 4.0, clock=lambda: now[0], sleep=sleep)) == messages
    assert slept == [0.25, 0.5]
    with pytest.raises(ValueError):
        list(paced(messages, 0.0))


@pytest.mark.parametrize(
    "kwargs",
    [{"prefetch": 0}, {"max_poll_records": 0}, {"fetch_timeout_s": 0}, {"heartbeat_interval_ms": 20000}],
)
def test_source_settings_are_checked_before_connecting(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        KafkaSource("127.0.0.1:1", "t", "g", **kwargs)
