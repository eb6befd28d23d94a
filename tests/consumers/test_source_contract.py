"""The Source contract, run against every registered kind of source (and the Prefetcher wrapper).

Each kind is opened through :func:`consumers.open.open_source`, holds the same ``N`` records in one
partition, and says how a restarted consumer resumes: a file or synthetic source from the offsets it
committed (as the service passes them back from its checkpoint), Kafka from its group's commit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from consumers.open import KAFKA_CLIENTS, SOURCES, open_source
from consumers.prefetch import Prefetcher
from consumers.producer import produce_messages
from consumers.recorded import write_messages
from consumers.source import Instrumented, Offsets, Source, next_offsets
from tests.consumers.streams import good_messages
from tests.fixtures.kafka import FAST_GROUP

N = 30


@dataclass
class Kind:
    """One kind of source holding ``ids`` (in order) in partition ``key``."""

    open: Callable[[Offsets | None], Source]
    committed: Callable[[Source], Offsets | None]  # what a restart resumes from (None: the source remembers)
    ids: list[str]
    key: tuple[str, int]
    finite: bool
    poll_timeout_s: float
    fetches_ahead: bool
    instrumented: bool = False


def _recorded(path: Path) -> Kind:
    write_messages(path, good_messages(N))
    return Kind(
        open=lambda start: open_source(f"file://{path}", start_offsets=start),
        committed=lambda source: source.committed,
        ids=[f"good-{i}" for i in range(N)],
        key=("src", 0),
        finite=True,
        poll_timeout_s=0.0,
        fetches_ahead=False,
    )


def _prefetched(path: Path) -> Kind:
    write_messages(path, good_messages(N))
    return Kind(
        open=lambda start: Prefetcher(open_source(str(path), start_offsets=start), depth=2, batch_size=7),
        committed=lambda source: source.source.committed,
        ids=[f"good-{i}" for i in range(N)],
        key=("src", 0),
        finite=True,
        poll_timeout_s=0.0,
        fetches_ahead=True,
    )


def _synthetic() -> Kind:
    return Kind(
        open=lambda start: open_source(f"synthetic://?records={N}&classes=3&dim=4", start_offsets=start),
        committed=lambda source: source.committed,
        ids=[f"synthetic-{i}" for i in range(N)],
        key=("synthetic", 0),
        finite=True,
        poll_timeout_s=0.0,
        fetches_ahead=False,
    )


def _kafka(bootstrap: str, topic: str, client: str) -> Kind:
    produce_messages(bootstrap, topic, good_messages(N))
    group = f"contract-{uuid.uuid4().hex[:8]}"
    return Kind(
        open=lambda start: open_source(
            f"kafka://{bootstrap}/{topic}",
            group=group,
            start_offsets=start,
            kafka_options=FAST_GROUP,
            kafka_client=client,
        ),
        committed=lambda source: None,
        ids=[f"good-{i}" for i in range(N)],
        key=(topic, 0),
        finite=False,
        poll_timeout_s=0.5,
        fetches_ahead=True,
        instrumented=True,
    )


KINDS = {
    "file": "file",
    "prefetched-file": "file",
    "synthetic": "synthetic",
    "kafka": "kafka",
    "kafka-librdkafka": "kafka",
}
"""Case -> the registry scheme it opens (the Kafka cases: one per client in KAFKA_CLIENTS)."""


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    if request.param == "file":
        return _recorded(tmp_path / "s.rec.gz")
    if request.param == "prefetched-file":
        return _prefetched(tmp_path / "s.rec.gz")
    if request.param == "synthetic":
        return _synthetic()
    make_topic = request.getfixturevalue("make_topic")
    client = request.param.removeprefix("kafka").removeprefix("-") or "kafka-python"
    return _kafka(request.getfixturevalue("kafka_bootstrap"), make_topic(1), client)


def test_every_registered_scheme_is_covered() -> None:
    assert set(KINDS.values()) == set(SOURCES), "a new source kind needs a case in this suite"
    kafka_cases = {k.removeprefix("kafka").removeprefix("-") or "kafka-python" for k in KINDS if k.startswith("kafka")}
    assert kafka_cases == set(KAFKA_CLIENTS), "a new Kafka client needs a case in this suite"


def _take(source: Source, n: int, timeout_s: float = 30.0) -> list[str]:
    """Up to ``n`` record ids, polling as the run loop does (with the source's own timeout)."""
    ids: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(ids) < n and not source.exhausted:
        assert time.monotonic() < deadline, f"only {len(ids)} of {n} records arrived"
        poll = source.poll(source.poll_timeout_s, n - len(ids))
        assert not poll.dead_letters
        ids += [r.id for r in poll.records]
    return ids


def _take_records(source: Source, n: int) -> list:
    records: list = []
    deadline = time.monotonic() + 30.0
    while len(records) < n:
        assert time.monotonic() < deadline, "records did not arrive"
        records += source.poll(source.poll_timeout_s, n - len(records)).records
    return records


def test_declares_how_to_drive_it(kind: Kind) -> None:
    with kind.open(None) as source:
        assert isinstance(source, Source)
        assert source.poll_timeout_s == kind.poll_timeout_s
        assert source.fetches_ahead is kind.fetches_ahead


def test_commit_is_next_to_consume_and_a_restart_resumes_after_it(kind: Kind) -> None:
    with kind.open(None) as source:
        first = _take_records(source, 12)
        assert [r.id for r in first] == kind.ids[:12]
        source.commit(next_offsets(r.position for r in first))
    resume = kind.committed(source)
    assert resume is None or resume == {kind.key: 12}
    with kind.open(resume) as again:
        assert _take(again, N - 12) == kind.ids[12:]


def test_leaving_on_an_exception_commits_nothing(kind: Kind) -> None:
    with pytest.raises(RuntimeError, match="learner failed"), kind.open(None) as source:
        assert len(_take_records(source, 5)) == 5
        raise RuntimeError("learner failed")
    resume = kind.committed(source)
    assert not resume
    with kind.open(resume) as again:
        assert _take(again, N) == kind.ids


def test_finite_sources_end_and_unbounded_ones_wait(kind: Kind) -> None:
    with kind.open(None) as source:
        assert _take(source, N) == kind.ids
        if kind.finite:
            deadline = time.monotonic() + 10
            while not source.exhausted:  # a reader may learn that the data ended only on its next poll
                assert time.monotonic() < deadline, "exhausted never turned true"
                assert not len(source.poll(source.poll_timeout_s, 10))
        else:
            assert not len(source.poll(source.poll_timeout_s, 10))
        assert source.exhausted is kind.finite


def test_lag_and_assignment_where_instrumented(kind: Kind) -> None:
    with kind.open(None) as source:
        assert isinstance(source, Instrumented) is kind.instrumented
        if not kind.instrumented:
            return
        _wait(lambda: source.assignment() == {kind.key} and source.lag() == {kind.key: N})
        assert source.assigned_at is not None and source.assigned_at <= time.monotonic()
        assert _take(source, N) == kind.ids
        _wait(lambda: source.lag() == {kind.key: 0})


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
