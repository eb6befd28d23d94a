"""The Redis pending store against a real redis-server: rollback to a checkpoint's generation, journals dropped
once no restore needs them, a retried call that ran, an outage, a Redis that lost its state, and the live
state kept without checkpoints."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from consumers.label_wire import LabelRecord, decode_label, encode_label
from consumers.record import Message, Position
from stream_cl.pending import PendingStateError
from stream_cl.pending_redis import RedisPending, open_redis_pending
from tests.fixtures.procs import free_port
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_delayed import classes, feature

_groups = itertools.count()


def label(sample_id: str, name: str, at_s: float) -> LabelRecord:
    entry = decode_label(Message(Position("labels", 0, int(at_s)), at_s, None, encode_label(sample_id, name)))
    assert isinstance(entry, LabelRecord)
    return entry


def store(server: RedisServer, group: str, *, journal: bool = True, ttl_s: float = 100, **kw: object) -> RedisPending:
    return RedisPending(
        server.client(), group=group, label_topic="labels", ttl_s=ttl_s, max_pending=3, journal=journal, **kw
    )


def contents(pending: RedisPending) -> tuple[list[str], list[str]]:
    return pending.pending_ids(), pending.waiting_ids()


def test_a_restore_undoes_every_change_after_the_checkpoint_and_replaying_them_joins_once(
    redis_server: RedisServer,
) -> None:
    group = f"rollback-{next(_groups)}"
    first = store(redis_server, group)
    first.restore(None)
    first.arrive([feature("a", 0), feature("b", 1)], classes(2))
    first.label([label("x", "cat", 2)])
    checkpoint = first.state_dict()
    first.saved(checkpoint)

    def after_the_checkpoint(s: RedisPending) -> list[str]:
        """Joins a, replaces b, adds c, d and e (the bound of 3 evicts b), waits y: every kind of change."""
        joined = [r.id for r, _, _ in s.label([label("a", "dog", 3)]).joined]
        settled = s.arrive([feature("b", 4), feature("c", 5), feature("d", 6), feature("e", 7)], classes(4))
        s.label([label("y", "cat", 8), label("x", "dog", 8)])
        return joined + [f"-{r.id}@{r.timestamp:g}" for r in settled.expired]

    assert after_the_checkpoint(first) == ["a", "-b@1", "-b@4"]
    assert contents(first) == (["c", "d", "e"], ["y", "x"])

    second = store(redis_server, group, rollback_chunk=2)  # the restart; its journal read 2 changes at a time
    second.restore(checkpoint)
    assert contents(second) == (["a", "b"], ["x"]) and second.sizes() == (2, 1)
    (b,) = [r for r, _, _ in second.label([label("b", "cat", 2.5)]).joined]
    assert (b.timestamp, b.message) == (1, feature("b", 1).message)  # the original entry, bytes and all
    second.restore(checkpoint)  # again: the join above is undone too
    assert after_the_checkpoint(second) == ["a", "-b@1", "-b@4"]  # the same outcome, a joined once


def three_checkpoints(pending: RedisPending, failed: int | None = None) -> list[dict]:
    """The states of three checkpoints, one sample arriving before each; the write of checkpoint ``failed`` (0-2)
    failed, so the store is never told it was saved."""
    pending.restore(None)
    states = []
    for i in range(3):
        pending.arrive([feature(f"s{i}", i)], classes(1))
        states.append(pending.state_dict())
        if i != failed:
            pending.saved(states[-1])
    return states


def journals(redis_server: RedisServer, pending: RedisPending) -> list[str]:
    """The generations whose undo journals the store keeps."""
    return sorted(k.decode().rsplit(":", 1)[1] for k in redis_server.client().keys(f"{pending.prefix}undo:*"))


def test_journals_are_kept_for_the_previous_checkpoint_only(redis_server: RedisServer) -> None:
    group = f"journal-{next(_groups)}"
    pending = store(redis_server, group)
    states = three_checkpoints(pending)
    assert journals(redis_server, pending) == ["3"]
    restarted = store(redis_server, group)
    restarted.restore(states[1])  # the newest checkpoint unreadable: the previous one still restores
    assert restarted.pending_ids() == ["s0", "s1"]
    with pytest.raises(PendingStateError, match="older than the journal kept"):
        store(redis_server, group).restore(states[0])


def test_a_failed_checkpoint_write_does_not_drop_the_journal_of_the_previous_checkpoint_written(
    redis_server: RedisServer,
) -> None:
    group = f"journal-failed-{next(_groups)}"
    pending = store(redis_server, group)
    states = three_checkpoints(pending, failed=1)  # the write of the second checkpoint failed: never saved
    assert journals(redis_server, pending) == ["2", "3"]
    restarted = store(redis_server, group)
    restarted.restore(states[0])  # the newest checkpoint unreadable: the one before it was the first
    assert restarted.pending_ids() == ["s0"]


def test_a_store_that_does_not_match_the_checkpoint_is_an_error(redis_server: RedisServer) -> None:
    group = f"mismatch-{next(_groups)}"
    live = store(redis_server, group, journal=False)  # a run without checkpoints left entries
    live.restore(None)
    live.arrive([feature("a", 0)], classes(1))
    with pytest.raises(PendingStateError, match="holds 1 samples and 0 labels, but no checkpoint expects 0 and 0"):
        store(redis_server, group).restore(None)
    with pytest.raises(PendingStateError, match="are under"):
        store(redis_server, "another-group").restore({**live.state_dict(), "generation": 1})
    with pytest.raises(PendingStateError, match="in memory"):
        store(redis_server, group).restore({"pending": [], "waiting": [], "feature_time": 0, "label_time": 0})


def test_a_retried_call_that_already_ran_returns_its_reply_instead_of_running_twice(
    redis_server: RedisServer,
) -> None:
    pending = store(redis_server, f"retry-{next(_groups)}")
    pending.restore(None)
    pending.arrive([feature("a", 0)], classes(1))
    first = pending.label([label("a", "cat", 1), label("z", "dog", 1)])
    pending.op -= 1  # as if the reply had been lost: the same call again
    again = pending.label([label("a", "cat", 1), label("z", "dog", 1)])
    assert [r.id for r, _, _ in again.joined] == [r.id for r, _, _ in first.joined] == ["a"]
    assert not again.unmatched and contents(pending) == ([], ["z"])


def test_an_outage_stops_the_store_until_redis_is_back_and_loses_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    try:
        pending = store(server, "outage", retry_min_s=0.05, retry_max_s=0.2)
        pending.restore(None)
        pending.arrive([feature("a", 0)], classes(1))
        server.kill()
        result = {}
        call = threading.Thread(target=lambda: result.update(s=pending.label([label("a", "cat", 1)])))
        call.start()
        call.join(1.0)
        assert call.is_alive() and not pending.healthy  # waits, and says so
        server.start()
        call.join(10)
        assert not call.is_alive() and pending.healthy
        assert [r.id for r, _, _ in result["s"].joined] == ["a"] and pending.sizes() == (0, 0)
    finally:
        server.kill()


def test_a_wait_for_redis_calls_back_every_second_however_long_the_back_off(tmp_path: Path) -> None:
    """The service's heartbeat and gauges hang on ``waiting``: a back-off of seconds must not silence it."""
    server = RedisServer(tmp_path)
    server.start()
    calls: list[float] = []
    try:
        pending = store(
            server, "waiting", retry_min_s=3.0, retry_max_s=3.0, waiting=lambda: calls.append(time.monotonic())
        )
        pending.restore(None)
        server.kill()
        started = time.monotonic()
        call = threading.Thread(target=lambda: pending.label([label("a", "cat", 1)]), daemon=True)
        call.start()
        deadline = started + 30
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call.is_alive() and not pending.healthy
        gaps = [b - a for a, b in zip([started, *calls], calls, strict=False)]
        # once per back-off (3 s) would not do; a loaded machine may be late by a second
        assert len(calls) >= 3 and max(gaps) < 2.5, f"called back at {[round(t - started, 2) for t in calls]}"
        server.start()
        call.join(10)
        assert not call.is_alive() and pending.healthy
    finally:
        server.kill()


def test_a_redis_that_lost_its_state_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=False)  # no persistence: a restart forgets everything
    server.start()
    try:
        pending = store(server, "lost")
        pending.restore(None)
        pending.arrive([feature("a", 0)], classes(1))
        server.restart()
        with pytest.raises(PendingStateError, match="lost its state"):
            pending.label([label("a", "cat", 1)])
    finally:
        server.kill()


def test_without_checkpoints_a_restart_resumes_with_the_live_state(redis_server: RedisServer) -> None:
    group = f"live-{next(_groups)}"
    first = store(redis_server, group, journal=False, ttl_s=10)
    first.restore(None)
    first.arrive([feature("a", 0), feature("b", 5)], classes(2))
    first.label([label("w", "cat", 3)])
    assert not redis_server.client().keys(f"{first.prefix}undo:*")  # nothing journaled

    second = store(redis_server, group, journal=False, ttl_s=10)
    second.restore(None)
    assert contents(second) == (["a", "b"], ["w"]) and (second.feature_time, second.label_time) == (5, 3)
    settled = second.label([label("late", "cat", 12)])
    assert [r.id for r in settled.expired] == ["a"] and np.array_equal(settled.expired[0].x, feature("a", 0).x)


def test_a_redis_that_cannot_be_reached_at_start_is_an_error_with_the_password_masked() -> None:
    with pytest.raises(ConnectionError, match=r"cannot reach the Redis pending store at redis://app:\*\*\*@") as error:
        open_redis_pending(
            f"redis://app:hunter2@127.0.0.1:{free_port()}/0",
            group="g",
            label_topic="labels",
            ttl_s=1,
            max_pending=1,
            journal=True,
        )
    assert "hunter2" not in str(error.value)
