"""KafkaSource over the librdkafka client (confluent-kafka) against a real broker (tansu): the group semantics
the source contract does not cover -- rebalance with two consumers, crash and resume, checkpoint starts, dead
letters, a missing topic -- plus the settings it translates and the error without the extra."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from consumers.dlq import KafkaDeadLetterSink
from consumers.kafka import KafkaSource, TopicNotFoundError
from consumers.kafka_librdkafka import LibrdkafkaConsumer, MissingExtraError, librdkafka_settings
from consumers.open import open_source
from consumers.producer import produce_messages
from consumers.record import Message
from consumers.source import next_offsets
from consumers.wire import REASONS
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.cli import main
from stream_cl.run import RUN_REASONS, RunOptions, RunParts, run_stream
from tests.consumers.streams import MAX_BYTES, bad_messages, good_messages
from tests.consumers.test_kafka import STABLE_GROUP, _learn, _read_topic, _slow_until, _stopping, _take, _wait
from tests.consumers.test_kafka_lag_and_faults import _committed, _drain, _offset, _produce_one_per_batch, _topics
from tests.fixtures.kafka import FAST_GROUP

Source = partial(KafkaSource, consumer_class=LibrdkafkaConsumer)


def test_two_consumers_split_the_partitions_and_learn_each_record_once(kafka_bootstrap, make_topic) -> None:
    """B joins while A is mid-stream (records prefetched, a batch being learned) and leaves mid-stream: A commits
    before each revoke, so across both rebalances no record is learned twice or skipped."""
    topic = make_topic(4)
    messages = good_messages(400)
    produce_messages(kafka_bootstrap, topic, messages[:200])
    stop_a, stop_b, split = threading.Event(), threading.Event(), threading.Event()
    seen_a: list[str] = []
    seen_b: list[str] = []
    with Source(kafka_bootstrap, topic, f"split-{topic}", **STABLE_GROUP) as a, _stopping(stop_a, stop_b):
        thread_a = threading.Thread(target=_learn, args=(a, seen_a, stop_a, partial(_slow_until, split)))
        thread_a.start()
        _wait(lambda: len(seen_a) >= 20)
        with Source(kafka_bootstrap, topic, f"split-{topic}", **STABLE_GROUP) as b:
            thread_b = threading.Thread(target=_learn, args=(b, seen_b, stop_b, 0.1))
            thread_b.start()
            _wait(lambda: a.assignment() and b.assignment() and not a.assignment() & b.assignment())
            assert len(a.assignment()) + len(b.assignment()) == 4
            assert len(seen_a) < 200  # the revoke really interrupted A
            split.set()
            produce_messages(kafka_bootstrap, topic, messages[200:])
            _wait(lambda: len(seen_b) >= 40)
            stop_b.set()
            thread_b.join()
        _wait(lambda: len(set(seen_a) | set(seen_b)) == 400)
        time.sleep(0.5)  # anything delivered twice would show up now
        stop_a.set()
        thread_a.join()
    both = Counter(seen_a) + Counter(seen_b)
    assert set(both) == {m.key.decode() for m in messages}
    assert max(both.values()) == 1, "a record was learned twice"


def test_a_crash_redelivers_what_was_learned_but_not_committed(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(100))
    with Source(kafka_bootstrap, topic, "resume", **FAST_GROUP) as first:
        taken = _take(first, 30)
        first.commit(next_offsets(r.position for r in taken))
    assert first.committed == {(topic, 0): 30}
    with pytest.raises(RuntimeError, match="crash"), Source(kafka_bootstrap, topic, "resume", **FAST_GROUP) as second:
        uncommitted = _take(second, 10)
        second.commit(next_offsets(r.position for r in uncommitted[:5]))  # pending, never sent: the crash wins
        raise RuntimeError("crash")
    assert [r.position.offset for r in uncommitted] == list(range(30, 40))
    with Source(kafka_bootstrap, topic, "resume", **FAST_GROUP) as third:
        rest = _take(third, 70)
        assert [r.position.offset for r in rest] == list(range(30, 100))
        third.commit(next_offsets(r.position for r in rest))
    assert third.committed == {(topic, 0): 100}
    assert _committed(kafka_bootstrap, topic, "resume", 1) == {0: 100}


def test_checkpoint_offsets_decide_every_start_and_are_committed(kafka_bootstrap, make_topic) -> None:
    """The group is ahead of the model (8 and 9); the checkpoint holds partition 0 only, so partition 1 starts
    at its earliest record; both starts are committed."""
    topic = make_topic(2)
    _produce_one_per_batch(kafka_bootstrap, topic, good_messages(20), 2)
    ahead = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id="ckpt", enable_auto_commit=False)
    ahead.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in ((0, 8), (1, 9))})
    ahead.close()
    url = f"kafka://{kafka_bootstrap}/{topic}"
    start = {(topic, 0): 3}
    options = {"kafka_options": FAST_GROUP, "kafka_client": "librdkafka"}
    with open_source(url, group="ckpt", start_offsets=start, from_checkpoint=True, **options) as s:
        got = _drain(s, 7 + 10)
        _wait(lambda: s.committed == {(topic, 0): 3, (topic, 1): 0})
        assert _committed(kafka_bootstrap, topic, "ckpt", 2) == {0: 3, 1: 0}
    assert [_offset(r) for r in got] == sorted([(0, o) for o in range(3, 10)] + [(1, o) for o in range(10)])


def test_start_offsets_lag_and_bounded_prefetch(kafka_bootstrap, make_topic) -> None:
    """Pausing at ``prefetch`` holds the buffer; the lag counts what is neither handed over nor fetched."""
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(100))
    with Source(kafka_bootstrap, topic, "seek", start_offsets={(topic, 0): 40}, prefetch=10, **FAST_GROUP) as s:
        _wait(lambda: s.lag() == {(topic, 0): 60})
        first = s.poll(1.0, 100)
        assert [r.position.offset for r in first.records] == list(range(40, 50))
        _wait(lambda: s.lag() == {(topic, 0): 50})
        rest = _take(s, 50)
        assert [r.position.offset for r in rest] == list(range(50, 100))
        _wait(lambda: s.lag() == {(topic, 0): 0})


def test_dead_letter_topic_gets_exactly_the_bad_records(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(4)
    good, bad = good_messages(40), bad_messages()
    mixed: list[Message] = []
    for i, m in enumerate(bad.values()):
        mixed += [*good[5 * i : 5 * i + 5], m]
    produce_messages(kafka_bootstrap, topic, mixed)
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)
    make_learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, buffer_size=50, width=16)
    options = RunOptions(batch_size=8, until_idle_s=2.0, progress=False)
    source = Source(kafka_bootstrap, topic, "dlq", max_bytes=MAX_BYTES, **FAST_GROUP)
    with source, KafkaDeadLetterSink(kafka_bootstrap) as sink:
        summary, _ = run_stream(source, make_learner, metrics, options, RunParts(dead_letters=sink))
    assert summary.learned == 40
    assert summary.dead_letter == dict.fromkeys(bad, 1)
    assert sum(source.committed.values()) == len(mixed)  # committed past the bad records too
    dlq = _read_topic(kafka_bootstrap, topic + ".dlq", expect=len(bad))
    assert sorted(m.key for m in dlq) == sorted(m.key for m in bad.values())
    assert {dict(m.headers)["reason"].decode() for m in dlq} == set(bad)


def test_a_missing_topic_is_an_error_and_is_not_created(kafka_bootstrap, make_topic) -> None:
    missing = f"missing-{time.monotonic_ns()}"
    url = f"kafka://{kafka_bootstrap}/{missing}"
    with pytest.raises(TopicNotFoundError, match=f"topic '{missing}' does not exist on {kafka_bootstrap}"):
        open_source(url, require_topic=True, kafka_options=FAST_GROUP, kafka_client="librdkafka")
    assert missing not in _topics(kafka_bootstrap)
    existing = make_topic(1)
    url = f"kafka://{kafka_bootstrap}/{existing}"
    with open_source(url, require_topic=True, kafka_options=FAST_GROUP, kafka_client="librdkafka") as s:
        assert s.exhausted is False


def test_cli_runs_from_kafka_with_the_librdkafka_client(kafka_bootstrap, make_topic, tmp_path: Path) -> None:
    topic = make_topic(2)
    produce_messages(kafka_bootstrap, topic, good_messages(30))
    summary = tmp_path / "s.json"
    args = ["run", "--source", f"kafka://{kafka_bootstrap}/{topic}", "--group", "cli", "--until-idle", "2"]
    args += ["--kafka-client", "librdkafka", "--kafka-session-timeout-ms", "2000", "--metrics-port", "0"]
    assert main([*args, "--no-progress", "--summary-json", str(summary), "--width", "16"]) == 0
    result = json.loads(summary.read_text())
    assert result["learned"] + result["held_out"] == 30 and not result["dead_letter"]
    assert sum(_committed(kafka_bootstrap, topic, "cli", 2).values()) == 30


def test_settings_keep_kafka_python_names() -> None:
    sasl = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u"}
    sasl |= {"sasl_plain_password": "p", "ssl_cafile": "ca.pem", "ssl_certfile": "c.pem", "ssl_keyfile": "k.pem"}
    assert librdkafka_settings(sasl) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p",
        "ssl.ca.location": "ca.pem",
        "ssl.certificate.location": "c.pem",
        "ssl.key.location": "k.pem",
    }
    with pytest.raises(ValueError, match=r"no librdkafka equivalent .*'not_a_kafka_setting'"):
        Source("127.0.0.1:1", "t", "g", client_options={"not_a_kafka_setting": 1})
    with pytest.raises(ValueError, match="librdkafka rejected"):
        Source("127.0.0.1:1", "t", "g", auto_offset_reset="sideways")


def test_both_clients_read_committed_transactions_only() -> None:
    """Records of aborted or open transactions are not data. kafka-python reads them by default, librdkafka not;
    the test broker cannot show the difference (it hands aborted records to every client), so the setting is
    checked: as kafka-python is given it, and as librdkafka receives it."""
    given: dict = {}

    def refusing(**settings: object) -> None:
        given.update(settings)
        raise KafkaError("not connecting")

    with pytest.raises(ConnectionError):
        KafkaSource("127.0.0.1:1", "t", "g", consumer_class=refusing)
    assert given["isolation_level"] == "read_committed"
    assert librdkafka_settings({"isolation_level": "read_committed"}) == {"isolation.level": "read_committed"}


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'stream-cl\[librdkafka\]'"):
        open_source("kafka://127.0.0.1:1/t", kafka_client="librdkafka")
    assert main(["run", "--source", "kafka://127.0.0.1:1/t", "--kafka-client", "librdkafka"]) == 2


def test_an_unknown_client_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown Kafka client 'java'; use one of kafka-python, librdkafka"):
        open_source("kafka://127.0.0.1:1/t", kafka_client="java")


def test_partitions_paused_by_backpressure_resume_after_a_rebalance_hands_them_back(
    kafka_bootstrap, make_topic
) -> None:
    """librdkafka keeps a partition paused across revoke and reassignment, where kafka-python starts it afresh:
    the source, told it is not paused, would never resume it, and the stream would stall for good."""
    topic = make_topic(2)
    _produce_one_per_batch(kafka_bootstrap, topic, good_messages(100), 2)
    with Source(kafka_bootstrap, topic, "paused", prefetch=10, **FAST_GROUP) as a:
        _wait(lambda: len(a._consumer.paused()) == 2)  # the buffer is full: fetching paused
        with Source(kafka_bootstrap, topic, "paused", **FAST_GROUP) as b:
            _wait(lambda: b.assignment())  # one partition each; B leaves without learning: A gets both back
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 100 and time.monotonic() < deadline:
            poll = a.poll(0.5, 100)
            got += poll.records
            a.commit(next_offsets(poll.positions()))
    assert sorted(map(_offset, got)) == [(p, o) for p in range(2) for o in range(50)]
