"""Prefetcher: order, commit semantics, exhaustion, errors and shutdown of the read-ahead thread."""

from __future__ import annotations

import threading

import pytest

from consumers.prefetch import Prefetcher
from consumers.record import Poll
from consumers.source import next_offsets
from consumers.synthetic import SyntheticSource


class ThreadRecordingSource(SyntheticSource):
    """A synthetic source that notes which thread polled and committed, and the commit order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poll_threads: set[str] = set()
        self.commit_log: list[tuple[str, dict]] = []
        self.closed = False

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        self.poll_threads.add(threading.current_thread().name)
        return super().poll(timeout_s, max_records)

    def commit(self, offsets) -> None:
        self.commit_log.append((threading.current_thread().name, dict(offsets)))
        super().commit(offsets)

    def close(self) -> None:
        self.closed = True


class FailingSource(SyntheticSource):
    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        if self._next >= 20:
            raise ConnectionError("broker went away")
        return super().poll(timeout_s, max_records)


def _drain(src, max_records: int = 10) -> list[str]:
    ids = []
    while not src.exhausted:
        ids += [r.id for r in src.poll(1.0, max_records).records]
    return ids


def test_order_and_content_match_the_wrapped_source() -> None:
    direct = SyntheticSource(137, dim=3, seed=4)
    expected = _drain(direct)
    with Prefetcher(SyntheticSource(137, dim=3, seed=4), depth=3, batch_size=10) as src:
        assert _drain(src) == expected
        assert src.exhausted


def test_caller_asking_for_fewer_records_gets_the_rest_next() -> None:
    with Prefetcher(SyntheticSource(25, dim=2), depth=2, batch_size=10) as src:
        sizes, ids = [], []
        while not src.exhausted:
            poll = src.poll(1.0, 4)
            sizes.append(len(poll))
            ids += [r.position.offset for r in poll.records]
    assert ids == list(range(25))
    assert max(sizes) == 4


def test_max_records_stops_the_read_ahead() -> None:
    inner = SyntheticSource(100, dim=2)
    with Prefetcher(inner, depth=4, batch_size=10, max_records=35) as src:
        assert len(_drain(src)) == 35
    assert inner._next == 35  # nothing beyond the limit was consumed from the source


def test_commits_reach_the_source_in_order_on_one_thread() -> None:
    inner = ThreadRecordingSource(50, dim=2)
    src = Prefetcher(inner, depth=2, batch_size=10)
    while not src.exhausted:
        poll = src.poll(1.0, 10)
        if len(poll):
            src.commit(next_offsets(poll.positions()))
    src.close()
    assert [offsets for _, offsets in inner.commit_log] == [{("synthetic", 0): n} for n in (10, 20, 30, 40, 50)]
    assert inner.committed == {("synthetic", 0): 50}
    assert inner.poll_threads == {"prefetch"}
    # while the thread runs it makes every call into the source; after it stops, commits go straight through
    threads = {name for name, _ in inner.commit_log}
    assert threads <= {"prefetch", threading.current_thread().name}
    src.commit({("synthetic", 0): 50})
    assert inner.commit_log[-1][0] == threading.current_thread().name


def test_close_stops_the_thread_and_closes_the_source() -> None:
    inner = ThreadRecordingSource(10_000, dim=2)
    src = Prefetcher(inner, depth=2, batch_size=10)
    src.poll(1.0, 10)
    src.commit({("synthetic", 0): 10})
    src.close()
    assert not src._thread.is_alive()
    assert inner.closed
    assert inner.committed == {("synthetic", 0): 10}
    assert inner._next <= 10 * (2 + 3)  # bounded read-ahead: queue depth + carry + in-flight polls
    src.close()  # idempotent


def test_source_error_is_raised_by_the_next_poll() -> None:
    with Prefetcher(FailingSource(100, dim=2), depth=2, batch_size=10) as src:
        assert len(src.poll(1.0, 10)) == 10
        assert len(src.poll(1.0, 10)) == 10
        with pytest.raises(ConnectionError, match="broker went away"):
            src.poll(1.0, 10)
        assert src.exhausted


@pytest.mark.parametrize("kwargs", [{"depth": 0}, {"batch_size": 0}, {"max_records": -1}, {"timeout_s": -1.0}])
def test_bad_settings_are_rejected(kwargs) -> None:
    with pytest.raises(ValueError):
        Prefetcher(SyntheticSource(1), **kwargs)
