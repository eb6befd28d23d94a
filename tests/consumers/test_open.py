"""The source registry (``consumers.open``): schemes, URL forms, options, dead-letter sinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.dlq import FileDeadLetterSink, KafkaDeadLetterSink
from consumers.kafka import KafkaSource
from consumers.open import SOURCES, open_dead_letters, open_source, source_scheme
from consumers.recorded import RecordedSource, write_messages
from consumers.synthetic import SyntheticSource
from consumers.urls import SyntheticUrl
from tests.consumers.streams import good_messages
from tests.fixtures.kafka import FAST_GROUP


def test_the_registry_names_its_schemes() -> None:
    assert set(SOURCES) == {"kafka", "file", "synthetic"}
    assert [source_scheme(u) for u in ("kafka://h:1/t", "file:///x", "synthetic://?records=1", "a/b.rec.gz")] == [
        "kafka",
        "file",
        "synthetic",
        "file",
    ]


def test_a_file_opens_by_plain_path_or_file_url(tmp_path: Path) -> None:
    path = tmp_path / "s.rec.gz"
    write_messages(path, good_messages(4))
    for url in (str(path), f"file://{path}"):
        with open_source(url, start_offsets={("src", 0): 1}) as source:
            assert isinstance(source, RecordedSource) and source.path == path
            assert [r.id for r in source.poll(0.0, 10).records] == ["good-1", "good-2", "good-3"]
    with pytest.raises(FileNotFoundError):
        open_source(f"file://{tmp_path}/missing.rec.gz")


def test_synthetic_urls_set_every_parameter() -> None:
    with open_source("synthetic://?records=5&classes=2&dim=3&seed=7&stream=syn") as source:
        assert isinstance(source, SyntheticSource)
        records = source.poll(0.0, 10).records
    assert len(records) == 5 and source.exhausted
    assert {r.label for r in records} == {("c0",), ("c1",)} and records[0].x.shape == (3,)
    assert records[0].position.stream == "syn"
    assert SyntheticUrl.parse("synthetic://?records=9") == SyntheticUrl(9, 10, 8, 0, "synthetic")


@pytest.mark.parametrize(
    "url",
    [
        "synthetic://",
        "synthetic://?classes=2",
        "synthetic://?records=x",
        "synthetic://?records=1&color=red",
        "synthetic://?records=1&records=2",
        "synthetic://host?records=1",
        "synthetic://?records=-1",
    ],
)
def test_bad_synthetic_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_source(url)


def test_an_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="kafka://, file://, synthetic://"):
        open_source("s3://bucket/stream.rec.gz")


def test_group_timings_in_kafka_options_reach_the_source() -> None:
    """Checked before connecting: the heartbeat must be shorter than the session (given as options)."""
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        open_source("kafka://127.0.0.1:1/t", kafka_options={"session_timeout_ms": 1000, "heartbeat_interval_ms": 1000})
    with pytest.raises(Exception, match="Unrecognized configs"):
        open_source("kafka://127.0.0.1:1/t", kafka_options={"not_a_kafka_setting": 1})


def test_kafka_urls_open_a_kafka_source(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(1)
    with open_source(f"kafka://{kafka_bootstrap}/{topic}", group="reg", kafka_options=FAST_GROUP) as source:
        assert isinstance(source, KafkaSource) and (source.topic, source.group) == (topic, "reg")


def test_dead_letters_go_to_a_file_a_topic_or_only_counters(kafka_bootstrap, tmp_path: Path) -> None:
    out = tmp_path / "dead.rec.gz"
    sink = open_dead_letters("synthetic://?records=1", dead_letter_out=out)
    assert isinstance(sink, FileDeadLetterSink) and sink.path == out
    sink.close()
    assert open_dead_letters(str(tmp_path / "s.rec.gz")) is None
    assert open_dead_letters("synthetic://?records=1") is None
    kafka = open_dead_letters(f"kafka://{kafka_bootstrap}/t", dead_letter_topic="t.bad")
    assert isinstance(kafka, KafkaDeadLetterSink)
    kafka.close()
