"""The Redis pending store against a real redis-server that misbehaves: damaged entries (a field deleted or
evicted, foreign bytes) and a Redis that refuses writes for a while (a replica after a failover, ``maxmemory``
reached). Each test has a server of its own: a script looping forever would leave a server busy for good."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

import pytest
import redis
from prometheus_client import CollectorRegistry

from monitoring.labeljoin import JoinMetrics
from stream_cl.delayed import DelayedLabels
from stream_cl.pending import UNMATCHED
from stream_cl.pending_redis import DAMAGED_LABEL, DAMAGED_SAMPLE, RedisPending
from tests.fixtures.procs import free_port
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_delayed import Labels, Sink, classes, feature
from tests.stream_cl.test_pending_redis import contents, label


def finishes(call: Callable[[], object], within_s: float = 10.0) -> object:
    """``call()``'s result; fails (instead of hanging) if it has not returned within ``within_s``."""
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)
    thread.start()
    thread.join(within_s)
    assert not thread.is_alive(), "the call did not return: Redis is stuck in the script"
    assert "value" in result, "the call raised"
    return result["value"]


def _store(server: RedisServer, group: str, **settings) -> RedisPending:
    """A journaled store of the label topic ``labels`` on ``server``: ``settings`` override the defaults."""
    return RedisPending(server.client(), **({"group": group, "label_topic": "labels", "journal": True} | settings))


def test_damaged_entries_are_given_up_and_counted_never_raised_or_looped_on(redis_aof: RedisServer) -> None:
    client = redis.Redis.from_url(redis_aof.url, socket_timeout=5)
    store = RedisPending(
        client, group="damaged", label_topic="labels", ttl_s=10, max_pending=100, journal=True, retry_max_s=0.2
    )
    labels, sink = Labels(), Sink()
    delayed = DelayedLabels(labels, sink, store=store, metrics=JoinMetrics(CollectorRegistry()))
    delayed.restore(None)
    delayed.arrive([feature(i, t) for t, i in enumerate("abcd")], classes(4))
    labels.send("w", "cat", 1)
    labels.send("v", "dog", 1)
    delayed.poll(100)
    checkpoint = delayed.state_dict()
    delayed.saved(checkpoint)

    admin, p = redis_aof.client(), store.prefix
    admin.hdel(p + "s:data", "a")  # its bytes deleted or evicted: only its order and time are left
    admin.hset(p + "s:data", "b", b"junk")  # foreign bytes
    admin.hdel(p + "s:ts", "c")  # no time
    admin.hset(p + "l:data", "w", b"junk")
    labels.send("b", "cat", 2)  # joins the junk sample b: b is given up, the label is dead
    labels.send("late", "cat", 20)  # a, c (no time: as old as can be) and d expire, oldest first
    step = finishes(lambda: delayed.poll(100))[0]
    assert not step.joined and [r.id for r in step.expired] == ["b", "", "c", "d"]  # a's id went with its bytes
    step = finishes(lambda: delayed.arrive([feature("w", 4)], classes(1)))  # joins the junk label w
    assert not step.joined and [r.id for r in step.expired] == ["w"]

    assert [(d.reason, d.detail) for d in sink.sent] == [(UNMATCHED, DAMAGED_SAMPLE), (UNMATCHED, DAMAGED_LABEL)]
    assert (sink.sent[1].message.value, sink.sent[1].message.position.stream) == (b"junk", "labels")
    assert contents(store) == ([], ["v", "late"]) and store.sizes() == (0, 2)
    # every sample and label has an outcome: 5 samples given up (b, c, a, d, w), 2 labels dead, 2 waiting
    assert (delayed.expired, delayed.consumed, delayed.unmatched, delayed.joined) == (5, 4, 2, 0)
    value = delayed.metrics.registry.get_sample_value
    assert (value("streamcl_pending_samples"), value("streamcl_labels_waiting")) == (0, 2)

    restarted = _store(redis_aof, "damaged", ttl_s=10, max_pending=100)
    restarted.restore(checkpoint)  # the damaged entries come back as they were at the checkpoint
    assert contents(restarted) == (["a", "b", "c", "d"], ["w", "v"])
    assert admin.hget(p + "s:data", "a") is None and admin.hget(p + "s:ts", "c") is None


def test_a_redis_that_refuses_writes_for_a_while_pauses_the_store_and_loses_nothing(redis_aof: RedisServer) -> None:
    """A failover makes the primary a replica (READONLY); ``maxmemory`` with ``noeviction`` refuses writes (OOM)."""
    store = _store(redis_aof, "refused", ttl_s=100, max_pending=10, retry_min_s=0.05, retry_max_s=0.2)
    store.restore(None)
    store.arrive([feature("a", 0)], classes(1))
    admin = redis_aof.client()
    refusals = [
        (("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0"), label("q", "cat", 1)),
        (("REPLICAOF", "127.0.0.1", str(free_port())), ("REPLICAOF", "NO", "ONE"), label("a", "cat", 2)),
    ]
    settled = []
    for refuse, allow, message in refusals:
        admin.execute_command(*refuse)
        call = threading.Thread(target=lambda m=message: settled.append(store.label([m])), daemon=True)
        call.start()
        call.join(1.0)
        assert call.is_alive() and not store.healthy  # waits, and says so
        admin.execute_command(*allow)
        call.join(10)
        assert not call.is_alive() and store.healthy
    assert [[r.id for r, _, _ in s.joined] for s in settled] == [[], ["a"]]
    assert contents(store) == ([], ["q"]) and store.sizes() == (0, 1)


def test_a_damaged_label_stored_by_an_earlier_run_is_dead_lettered_on_the_label_topic(redis_aof: RedisServer) -> None:
    """After a restart the first call may be an arrival joining a damaged label: nothing of this run (nor of an
    earlier version, which kept no topic in Redis) has told the store the label topic, only its builder has."""
    store = _store(redis_aof, "upgraded", ttl_s=10, max_pending=10)
    store.restore(None)
    store.label([label("w", "cat", 1)])
    checkpoint = store.state_dict()
    store.saved(checkpoint)
    store.close()
    admin, p = redis_aof.client(), store.prefix
    admin.hset(p + "l:data", "w", b"junk")
    admin.hdel(p + "meta", "topic")  # as an earlier version left it (when it wrote one at all)

    restarted = _store(redis_aof, "upgraded", ttl_s=10, max_pending=10)
    sink = Sink()
    delayed = DelayedLabels(Labels(), sink, store=restarted, metrics=JoinMetrics(CollectorRegistry()))
    delayed.restore(checkpoint)
    step = delayed.arrive([feature("w", 2)], classes(1))  # the first call of the run joins the junk label
    assert not step.joined and [r.id for r in step.expired] == ["w"]
    [dead] = sink.sent
    assert (dead.reason, dead.detail, dead.message.value) == (UNMATCHED, DAMAGED_LABEL, b"junk")
    assert dead.message.position.stream == "labels"  # so it goes to labels.dlq, not to ".dlq"


def test_a_restart_while_redis_refuses_writes_waits_for_it_instead_of_failing(redis_aof: RedisServer) -> None:
    """A restart during a failover (the old primary a replica for now: READONLY) or with ``maxmemory`` reached (OOM)
    waits for Redis to take writes again, as the per-batch calls do, and then restores the checkpoint."""
    first = _store(redis_aof, "restart", ttl_s=100, max_pending=10)
    first.restore(None)
    first.arrive([feature("a", 0)], classes(1))
    checkpoint = first.state_dict()
    first.saved(checkpoint)
    first.label([label("a", "cat", 1)])  # after the checkpoint: the restore undoes it
    admin = redis_aof.client()
    refusals = [
        (("REPLICAOF", "127.0.0.1", str(free_port())), ("REPLICAOF", "NO", "ONE")),
        (("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0")),
    ]
    for refuse, allow in refusals:
        restarted = _store(redis_aof, "restart", ttl_s=100, max_pending=10, retry_min_s=0.05, retry_max_s=0.2)
        admin.execute_command(*refuse)
        call = threading.Thread(target=lambda s=restarted: s.restore(checkpoint), daemon=True)
        call.start()
        call.join(1.0)
        assert call.is_alive() and not restarted.healthy  # waits, and says so
        admin.execute_command(*allow)
        call.join(10)
        assert not call.is_alive() and restarted.healthy
        assert contents(restarted) == (["a"], []) and restarted.sizes() == (1, 0)


def test_a_long_wait_for_a_redis_that_refuses_writes_is_logged_again_with_how_long_and_why(
    redis_aof: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """``--pending`` on a read-only replica: start-up waits (as in an outage), and keeps saying why in the log."""
    store = _store(
        redis_aof, "replica", ttl_s=100, max_pending=10, retry_min_s=0.05, retry_max_s=0.1, report_every_s=0.5
    )
    admin = redis_aof.client()
    admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    caplog.set_level(logging.WARNING, logger="stream_cl.pending")
    call = threading.Thread(target=lambda: store.restore(None), daemon=True)
    started = time.monotonic()
    call.start()
    call.join(1.8)
    assert call.is_alive() and not store.healthy  # still waiting ...
    admin.execute_command("REPLICAOF", "NO", "ONE")
    call.join(10)
    waited_s = time.monotonic() - started  # however long a loaded machine took to notice Redis is back
    assert not call.is_alive() and store.healthy
    messages = [r.getMessage() for r in caplog.records if r.name == "stream_cl.pending"]
    first, *again, back = messages
    assert "cannot be used" in first and "ReadOnlyError" in first
    # ... and said so again every 0.5 s (never more often), with how long it has waited and the latest error
    assert 2 <= len(again) <= waited_s / 0.5, (waited_s, messages)
    waited = [float(re.search(r"after (\d+) s", m).group(1)) for m in again]
    assert all("still cannot be used" in m and "ReadOnlyError" in m for m in again) and waited == sorted(waited)
    assert back.startswith("the Redis pending store is reachable again after")
