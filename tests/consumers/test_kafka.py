"""KafkaSource, the dead-letter topic, and record/replay against a real broker (tansu)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from consumers.capture import record_topic
from consumers.dlq import KafkaDeadLetterSink
from consumers.kafka import KafkaSource
from consumers.producer import produce_messages
from consumers.record import Message, Position
from consumers.recorded import RecordedSource, read_messages, write_messages
from consumers.source import next_offsets
from consumers.wire import REASONS
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.cli import main
from stream_cl.run import RUN_REASONS, RunOptions, RunParts, run_stream
from tests.consumers.streams import MAX_BYTES, bad_messages, good_messages
from tests.fixtures.kafka import FAST_GROUP

STABLE_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
"""For the rebalance test: no spurious evictions on a loaded 2-core machine (first join ~3 s)."""


def _learn(
    source: KafkaSource, seen: list[str], stop: threading.Event, step_s: float | Callable[[], float] = 0.0
) -> None:
    """A stand-in learner: take a batch, 'learn' it for ``step_s`` seconds (or ``step_s()``: a pace that changes),
    commit it."""
    pace = step_s if callable(step_s) else lambda: step_s
    while not stop.is_set():
        poll = source.poll(0.1, 5)
        if len(poll):
            time.sleep(pace())
            seen.extend(r.id for r in poll.records)
            source.commit(next_offsets(poll.positions()))


@contextmanager
def _stopping(*events: threading.Event) -> Iterator[None]:
    """Set ``events`` on leaving the block, a failed assertion included: the learner threads then end instead of
    polling a closed source for the rest of the session."""
    try:
        yield
    finally:
        for event in events:
            event.set()


def _slow_until(split: threading.Event) -> float:
    """A's pace in the rebalance tests: slow (0.5 s a poll of 5) until the split, so that A cannot learn all
    that was produced before B joined, however long the broker's rebalance timers take on a loaded machine."""
    return 0.1 if split.is_set() else 0.5


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_consumers_split_the_partitions_and_learn_each_record_once(kafka_bootstrap, make_topic) -> None:
    """A is mid-stream (undelivered records prefetched) when B joins, and B leaves mid-stream: nothing is
    learned twice or skipped across both rebalances."""
    topic = make_topic(4)
    messages = good_messages(400)
    produce_messages(kafka_bootstrap, topic, messages[:200])
    stop_a, stop_b, split = threading.Event(), threading.Event(), threading.Event()
    seen_a: list[str] = []
    seen_b: list[str] = []
    with KafkaSource(kafka_bootstrap, topic, f"split-{topic}", **STABLE_GROUP) as a, _stopping(stop_a, stop_b):
        thread_a = threading.Thread(target=_learn, args=(a, seen_a, stop_a, partial(_slow_until, split)))
        thread_a.start()
        _wait(lambda: len(seen_a) >= 20)
        with KafkaSource(kafka_bootstrap, topic, f"split-{topic}", **STABLE_GROUP) as b:
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


def test_restart_resumes_after_the_last_commit(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(100))
    with KafkaSource(kafka_bootstrap, topic, "resume", **FAST_GROUP) as first:
        taken = []
        while len(taken) < 30:
            taken += first.poll(1.0, 30 - len(taken)).records
        first.commit(next_offsets(r.position for r in taken))
    assert [r.position.offset for r in taken] == list(range(30))
    try:  # learned 10 more, but crashed before committing them: they must come again
        with KafkaSource(kafka_bootstrap, topic, "resume", **FAST_GROUP) as second:
            uncommitted = []
            while len(uncommitted) < 10:
                uncommitted += second.poll(1.0, 10 - len(uncommitted)).records
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert [r.position.offset for r in uncommitted] == list(range(30, 40))
    with KafkaSource(kafka_bootstrap, topic, "resume", **FAST_GROUP) as third:
        rest = []
        while len(rest) < 70:
            rest += third.poll(1.0, 100).records
        assert [r.position.offset for r in rest] == list(range(30, 100))
        third.commit(next_offsets(r.position for r in rest))
    assert third.committed == {(topic, 0): 100}


def test_start_offsets_lag_and_bounded_prefetch(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(100))
    with KafkaSource(kafka_bootstrap, topic, "seek", start_offsets={(topic, 0): 40}, prefetch=10, **FAST_GROUP) as s:
        _wait(lambda: s.lag() == {(topic, 0): 60})  # 60 records not yet handed over, 10 of them prefetched
        first = s.poll(1.0, 100)
        assert [r.position.offset for r in first.records] == list(range(40, 50))  # never more than prefetch
        _wait(lambda: s.lag() == {(topic, 0): 50})
        assert s.take_decode_seconds() and not s.take_decode_seconds()


def _take(source: KafkaSource, n: int) -> list:
    taken: list = []
    while len(taken) < n:
        taken += source.poll(1.0, n - len(taken)).records
    return taken


def _broker_committed(bootstrap: str, topic: str, group: str) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close()


def test_commits_are_coalesced_and_close_sends_the_last_one(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(100))
    with KafkaSource(kafka_bootstrap, topic, "coalesce", prefetch=20, commit_interval_s=3600, **FAST_GROUP) as s:
        s.commit(next_offsets(r.position for r in _take(s, 10)))  # the first commit is due at once
        _wait(lambda: s.committed == {(topic, 0): 10})
        for _ in range(2):
            s.commit(next_offsets(r.position for r in _take(s, 10)))
        time.sleep(0.5)  # several fetch-thread turns: none may send offsets before the interval is over
        assert s.committed == {(topic, 0): 10}
        assert _broker_committed(kafka_bootstrap, topic, "coalesce") == 10
    assert s.committed == {(topic, 0): 30}
    assert _broker_committed(kafka_bootstrap, topic, "coalesce") == 30


def test_without_an_interval_each_commit_wakes_a_paused_fetch_thread(kafka_bootstrap, make_topic) -> None:
    """A fetch timeout far beyond the waits below: only the commit's wake-up can send the offsets in time."""
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, good_messages(100))
    options = {"prefetch": 10, "commit_interval_s": 0, "fetch_timeout_s": 60}
    with KafkaSource(kafka_bootstrap, topic, "prompt", **options, **FAST_GROUP) as s:
        for end in (2, 4):  # the buffer stays above its low watermark (5): the fetch thread stays paused
            s.commit(next_offsets(r.position for r in _take(s, 2)))
            _wait(lambda end=end: s.committed == {(topic, 0): end}, timeout_s=20)
            assert _broker_committed(kafka_bootstrap, topic, "prompt") == end


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
    source = KafkaSource(kafka_bootstrap, topic, "dlq", max_bytes=MAX_BYTES, **FAST_GROUP)
    with source, KafkaDeadLetterSink(kafka_bootstrap) as sink:
        summary, _ = run_stream(source, make_learner, metrics, options, RunParts(dead_letters=sink))
    assert summary.learned == 40
    assert summary.dead_letter == dict.fromkeys(bad, 1)
    assert metrics.registry.get_sample_value("streamcl_dead_letter_total", {"reason": "oversized"}) == 1
    assert sum(source.committed.values()) == len(mixed)  # committed past the bad records too
    dlq = _read_topic(kafka_bootstrap, topic + ".dlq", expect=len(bad))
    assert sorted(m.key for m in dlq) == sorted(m.key for m in bad.values())
    for m in dlq:
        headers = dict(m.headers)
        original = next(b for r, b in bad.items() if b.key == m.key and r == headers["reason"].decode())
        assert m.value == original.value
        assert m.headers[: len(original.headers)] == original.headers
        assert headers["source-topic"] == topic.encode()


@pytest.mark.parametrize("keep_timestamps", [False, True])
def test_record_replay_round_trip_is_byte_identical(
    kafka_bootstrap, make_topic, tmp_path: Path, keep_timestamps: bool
) -> None:
    """Keys, values, headers and partitions arrive as recorded; timestamps too with ``--keep-timestamps`` (else
    the replay's own, a second or more later: recording waits a second for the topic to go idle)."""
    first, second = make_topic(4), make_topic(4)
    messages = [*good_messages(30), *bad_messages().values()]
    messages.append(Message(messages[0].position, 0.0, None, b"null key", (("h", b""), ("h", b"\x00"))))
    produce_messages(kafka_bootstrap, first, messages)
    url = f"kafka://{kafka_bootstrap}"
    assert main(["record", "--source", f"{url}/{first}", "--out", str(tmp_path / "a.rec.gz"), "--until-idle", "1"]) == 0
    keep = ["--keep-timestamps"] if keep_timestamps else []
    assert main(["replay", str(tmp_path / "a.rec.gz"), "--to", f"{url}/{second}", "--keep-partitions", *keep]) == 0
    assert record_topic(kafka_bootstrap, second, tmp_path / "b.rec.gz", until_idle_s=1.0) == len(messages)
    stamps = {(m.position.partition, m.position.offset): m.timestamp for m in read_messages(tmp_path / "a.rec.gz")}
    replayed = {(m.position.partition, m.position.offset): m.timestamp for m in read_messages(tmp_path / "b.rec.gz")}
    same = [replayed[at] == stamp for at, stamp in stamps.items()]
    assert all(same) if keep_timestamps else not any(same)

    def content(path: Path) -> list[tuple]:
        out = [(m.position.partition, m.position.offset, m.key, m.value, m.headers) for m in read_messages(path)]
        return sorted(out, key=lambda t: t[:2])

    a, b = content(tmp_path / "a.rec.gz"), content(tmp_path / "b.rec.gz")
    assert len(a) == len(messages) and a == b
    assert sorted((m.key or b"", m.value, m.headers) for m in messages) == sorted((k or b"", v, h) for *_, k, v, h in a)


def test_a_message_without_a_timestamp_is_replayed_with_the_previous_ones(kafka_bootstrap, make_topic) -> None:
    """Not with the time of sending, which would move a consumer's event-time clock decades past the recording."""
    topic = make_topic(1)
    stamps = [5.0, -0.001, math.nan, 7.0]
    sent = [Message(Position("rec", 0, i), t, None, b"v", ()) for i, t in enumerate(stamps)]
    produce_messages(kafka_bootstrap, topic, sent, keep_timestamps=True)
    assert [m.timestamp for m in _read_topic(kafka_bootstrap, topic, 4)] == [5.0, 5.0, 5.0, 7.0]


def _read_topic(bootstrap: str, topic: str, expect: int) -> list[Message]:
    out: list[Message] = []
    with_timeout = time.monotonic() + 20
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        _wait(lambda: consumer.partitions_for_topic(topic) is not None)
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while len(out) < expect and time.monotonic() < with_timeout:
            for records in consumer.poll(timeout_ms=200).values():
                from consumers.kafka import message_from_record

                out += [message_from_record(r) for r in records]
    finally:
        consumer.close()
    return out


def test_cli_produce_and_run_from_kafka(kafka_bootstrap, make_topic, tmp_path: Path) -> None:
    from tests.consumers.test_replay import _write_fashion_mnist

    topic = make_topic(4)
    _write_fashion_mnist(tmp_path)
    url = f"kafka://{kafka_bootstrap}/{topic}"
    assert main(["produce", "fashion-mnist", "--data-dir", str(tmp_path), "--to", url, "--limit", "40"]) == 0
    summary = tmp_path / "s.json"
    args = ["run", "--source", url, "--group", "cli", "--until-idle", "2", "--kafka-session-timeout-ms", "2000"]
    assert main([*args, "--metrics-port", "0", "--no-progress", "--summary-json", str(summary), "--width", "16"]) == 0
    result = json.loads(summary.read_text())
    assert result["learned"] + result["held_out"] == 40 and not result["dead_letter"]


def test_client_options_reach_the_kafka_client() -> None:
    """SASL/TLS settings pass straight through: kafka-python itself validates them."""
    with pytest.raises(Exception, match="Unrecognized configs"):
        KafkaSource("127.0.0.1:1", "t", "g", client_options={"not_a_kafka_setting": 1})


def test_rate_and_lag_gauges_tell_the_truth_once_the_stream_is_idle(kafka_bootstrap, make_topic) -> None:
    topic = make_topic(2)
    produce_messages(kafka_bootstrap, topic, good_messages(60))
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)
    make_learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, buffer_size=50, width=16)
    source = KafkaSource(kafka_bootstrap, topic, "idle-gauges", **FAST_GROUP)
    with source:
        summary, _ = run_stream(
            source, make_learner, metrics, RunOptions(batch_size=8, until_idle_s=3.0, progress=False)
        )
    assert summary.learned == 60
    assert metrics.registry.get_sample_value("streamcl_samples_per_second") == 0.0  # idle: no stale rate
    lags = [
        metrics.registry.get_sample_value("streamcl_consumer_lag", {"topic": topic, "partition": str(p)})
        for p in (0, 1)
    ]
    assert lags == [0.0, 0.0]
    assert metrics.registry.get_sample_value("streamcl_assigned_partitions") == 2


def test_a_file_source_exports_no_partition_count(tmp_path) -> None:
    """A file source owns no partitions: a 0 from it would look like a consumer left without any."""
    path = tmp_path / "s.rec.gz"
    write_messages(path, good_messages(20))
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)
    make_learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, buffer_size=50, width=16)
    with RecordedSource(path) as source:
        run_stream(source, make_learner, metrics, RunOptions(batch_size=8, progress=False))
    assert metrics.registry.get_sample_value("streamcl_assigned_partitions") is None


def test_a_learner_step_longer_than_the_session_timeout_is_not_learned_twice(
    kafka_bootstrap, make_topic, caplog: pytest.LogCaptureFixture
) -> None:
    """A holds a batch for 12 s, twice its session timeout (a group's first step on a loaded machine), while B
    joins: the revoke must wait for A's commit, since A learns what it holds either way and B would read it again
    from the last commit; and the wait must not stop A's heartbeats, or the group evicts A, refuses its commit on
    revoke, and B learns A's batch again."""
    caplog.set_level(logging.WARNING)
    topic = make_topic(4)
    messages = good_messages(120)
    produce_messages(kafka_bootstrap, topic, messages)
    seen_a: list[str] = []
    seen_b: list[str] = []
    stop_a, stop_b = threading.Event(), threading.Event()
    with KafkaSource(kafka_bootstrap, topic, "slow-step", **STABLE_GROUP) as a, _stopping(stop_a, stop_b):
        _wait(lambda: len(a.assignment()) == 4)
        first = a.poll(5.0, 40)
        assert len(first)
        with KafkaSource(kafka_bootstrap, topic, "slow-step", **STABLE_GROUP) as b:
            thread_b = threading.Thread(target=_learn, args=(b, seen_b, stop_b))
            thread_b.start()
            time.sleep(12.0)  # the slow step: B's join has A's partitions revoked meanwhile
            seen_a.extend(r.id for r in first.records)
            a.commit(next_offsets(first.positions()))
            thread_a = threading.Thread(target=_learn, args=(a, seen_a, stop_a))
            thread_a.start()
            _wait(lambda: len(set(seen_a) | set(seen_b)) == 120)
            assert b.assignment()  # B did take partitions over
            time.sleep(0.5)  # anything delivered twice would show up now
            stop_a.set()
            stop_b.set()
            thread_a.join()
            thread_b.join()
    both = Counter(seen_a) + Counter(seen_b)
    assert set(both) == {m.key.decode() for m in messages}
    assert max(both.values()) == 1, sorted(k for k, n in both.items() if n > 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "session expired" in w or "commit on revoke failed" in w], warnings
