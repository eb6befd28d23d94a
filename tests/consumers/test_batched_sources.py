"""Sources over messages of several samples (wire format 2): exact positions, commits and resumes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from functools import partial

import numpy as np
import pytest
from kafka import KafkaConsumer

from consumers.kafka import KafkaSource
from consumers.kafka_librdkafka import LibrdkafkaConsumer
from consumers.producer import produce_messages
from consumers.record import Message, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.source import NextOffsets, next_offsets
from consumers.wire import encode_batch_binary
from tests.fixtures.kafka import FAST_GROUP

PER_MESSAGE = 7
N_SAMPLES = 60  # 9 messages: 8 of 7 samples and one of 4


def batched(stream: str, bad: int | None = None) -> list[Message]:
    """``N_SAMPLES`` samples s0, s1, ... in messages of ``PER_MESSAGE``; sample ``bad`` holds a NaN."""
    x = np.arange(N_SAMPLES * 3, dtype=np.float32).reshape(N_SAMPLES, 3)
    if bad is not None:
        x[bad, 1] = np.nan
    out = []
    for offset, first in enumerate(range(0, N_SAMPLES, PER_MESSAGE)):
        ids = [f"s{i}" for i in range(first, min(first + PER_MESSAGE, N_SAMPLES))]
        value, headers = encode_batch_binary(ids, x[first : first + PER_MESSAGE], ["c"] * len(ids))
        out.append(Message(Position(stream, 0, offset), float(offset), None, value, tuple(headers)))
    return out


def ids_of(polls) -> list[str]:
    return [r.id for p in polls for r in p.records]


def take(source, n: int, limit: int = 10) -> list:
    """Polls of at most ``limit`` samples until ``n`` samples (records or dead letters) came."""
    polls, got = [], 0
    while got < n:
        poll = source.poll(1.0, min(limit, n - got))
        assert len(poll) <= min(limit, n - got)
        polls.append(poll)
        got += len(poll)
    return polls


def test_a_recorded_source_hands_samples_out_in_polls_of_at_most_max_records_and_resumes_mid_message(tmp_path):
    path = tmp_path / "batched.rec.gz"
    write_messages(path, batched("file", bad=9))
    with RecordedSource(path) as first:
        polls = take(first, 25, limit=4)
        progress = NextOffsets()
        for poll in polls:
            progress.advance(next_offsets(poll.positions()))
    # 25 samples: messages 0-2 (21 samples) done, 4 of message 3 done
    assert progress == {("file", 0): 3} and progress.within == {("file", 0): 4}
    dead = [d for p in polls for d in p.dead_letters]
    assert [(d.reason, d.message.position.offset, d.message.position.index) for d in dead] == [("non_finite", 1, 2)]
    with RecordedSource(path, start_offsets=progress) as second:
        rest = take(second, N_SAMPLES - 25)
        assert not len(second.poll(0.0, 10)) and second.exhausted
    learned = ids_of(polls) + ids_of(rest)
    assert learned == [f"s{i}" for i in range(N_SAMPLES) if i != 9]  # each once, in order, none skipped


def test_kafka_commits_a_message_only_when_all_its_samples_are_done_and_a_checkpoint_resumes_at_the_sample(
    kafka_bootstrap, make_topic
):
    topic = make_topic(1)
    produce_messages(kafka_bootstrap, topic, batched(topic, bad=16))
    with KafkaSource(kafka_bootstrap, topic, "batched", commit_interval_s=0, **FAST_GROUP) as first:
        polls = take(first, 24)  # the last poll ends on sample 3 of message 3
        checkpoint = NextOffsets()
        for poll in polls:
            offsets = next_offsets(poll.positions())
            first.commit(offsets)
            checkpoint.advance(offsets)
    assert first.committed == {(topic, 0): 3}  # message 3 is not done: the group re-reads it from its start
    assert checkpoint.within == {(topic, 0): 3}
    dead = [d for p in polls for d in p.dead_letters]
    assert [(d.reason, d.message.position.offset, d.message.position.index) for d in dead] == [("non_finite", 2, 2)]
    assert ids_of(polls) == [f"s{i}" for i in range(24) if i != 16]

    # a restart from the checkpoint (as serve does) skips exactly the 3 samples of message 3 learned already
    with KafkaSource(
        kafka_bootstrap, topic, "batched", start_offsets=checkpoint, from_checkpoint=True, **FAST_GROUP
    ) as second:
        rest = take(second, N_SAMPLES - 24)
        second.commit(next_offsets(p for poll in rest for p in poll.positions()))
    assert second.committed == {(topic, 0): 9}
    assert ids_of(polls) + ids_of(rest) == [f"s{i}" for i in range(N_SAMPLES) if i != 16]

    # a restart from the group's offset learns message 3 again from its start (at-least-once, message by message)
    with KafkaSource(kafka_bootstrap, topic, "batched-group", start_offsets={(topic, 0): 3}, **FAST_GROUP) as third:
        again = take(third, N_SAMPLES - 21)
    assert ids_of(again) == [f"s{i}" for i in range(21, N_SAMPLES)]


@pytest.mark.parametrize("client", [KafkaConsumer, LibrdkafkaConsumer], ids=["kafka-python", "librdkafka"])
def test_a_rebalance_lets_the_owner_finish_a_message_it_handed_over_in_part(
    kafka_bootstrap, make_topic, client
) -> None:
    """Polls of 5 samples split messages of 7: when B joins, A is mid-message on some partition. Kafka can only
    commit whole messages, so A must finish that message before the revoke commits, or B learns its first
    samples again."""
    from tests.consumers.test_kafka import STABLE_GROUP, _learn, _slow_until, _stopping, _wait

    topic = make_topic(4)
    x = np.zeros((PER_MESSAGE, 3), dtype=np.float32)
    messages = []
    for offset in range(40):
        ids = [f"m{offset}s{i}" for i in range(PER_MESSAGE)]
        value, headers = encode_batch_binary(ids, x, ["c"] * PER_MESSAGE)
        messages.append(Message(Position(topic, offset % 4, offset // 4), 0.0, None, value, tuple(headers)))
    produce_messages(kafka_bootstrap, topic, messages[:20], keep_partitions=True)
    stop_a, stop_b, split = threading.Event(), threading.Event(), threading.Event()
    seen_a: list[str] = []
    seen_b: list[str] = []
    with (
        KafkaSource(kafka_bootstrap, topic, f"split-{topic}", consumer_class=client, **STABLE_GROUP) as a,
        _stopping(stop_a, stop_b),
    ):
        thread_a = threading.Thread(target=_learn, args=(a, seen_a, stop_a, partial(_slow_until, split)))
        thread_a.start()
        _wait(lambda: len(seen_a) >= 12)
        with KafkaSource(kafka_bootstrap, topic, f"split-{topic}", consumer_class=client, **STABLE_GROUP) as b:
            thread_b = threading.Thread(target=_learn, args=(b, seen_b, stop_b, 0.1))
            thread_b.start()
            _wait(lambda: a.assignment() and b.assignment() and not a.assignment() & b.assignment())
            assert len(seen_a) < 20 * PER_MESSAGE  # the revoke really interrupted A
            split.set()
            produce_messages(kafka_bootstrap, topic, messages[20:], keep_partitions=True)
            _wait(lambda: len(set(seen_a) | set(seen_b)) == 40 * PER_MESSAGE)
            time.sleep(0.5)  # anything delivered twice would show up now
            stop_a.set()
            stop_b.set()
            thread_a.join()
            thread_b.join()
    both = Counter(seen_a) + Counter(seen_b)
    assert len(both) == 40 * PER_MESSAGE
    assert max(both.values()) == 1, sorted(k for k, n in both.items() if n > 1)
