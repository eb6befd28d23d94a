"""``streamcl_overloaded`` follows the lag also while no records arrive: a worker that was behind and lost its
partitions in a rebalance polls nothing from then on, and must stop reading as overloaded."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from consumers.record import Poll
from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.assemble import known_lag
from stream_cl.build import build_learner
from stream_cl.overload import OverloadPolicy
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.streams import write_stream

make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=16)


class Revoked:
    """A consumer far behind its partition until a rebalance takes the partition away, once the recorded
    stream has been handed over: from then on it polls nothing and has no lag (its lag series are gone)."""

    poll_timeout_s, fetches_ahead, exhausted = 0.0, False, False

    def __init__(self, source: RecordedSource) -> None:
        self.source, self.assigned = source, True

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        if not self.assigned:
            return Poll()
        poll = self.source.poll(timeout_s, max_records)
        self.assigned = not self.source.exhausted
        return poll

    def lag(self) -> dict[tuple[str, int], int]:
        return {("test", 0): 5000} if self.assigned else {}

    def commit(self, offsets) -> None:
        self.source.commit(offsets)

    def close(self) -> None:
        self.source.close()


def test_a_worker_that_lost_its_partitions_stops_reading_as_overloaded(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    with RecordedSource(write_stream(tmp_path / "s.rec.gz", n_classes=2, per_class=20)) as recorded:
        source = Revoked(recorded)
        overload = OverloadPolicy("predict-only", max_lag=100, lag=lambda: sum(source.lag().values()), metrics=metrics)
        summary, _ = run_stream(
            source,
            make,
            metrics,
            RunOptions(batch_size=10, until_idle_s=0.2, progress=False),
            RunParts(ProbeSet(fraction=0.0), overload=overload),
        )
    assert summary.overload_skipped == 40 and summary.learned == 0  # behind while the records came
    assert metrics.registry.get_sample_value("streamcl_overloaded") == 0


def test_refresh_judges_the_lag_without_a_batch() -> None:
    metrics, lag = Metrics(CollectorRegistry()), [500]
    overload = OverloadPolicy("queue", max_lag=100, lag=lambda: lag[0], metrics=metrics)
    overload.refresh()
    assert overload.behind and metrics.registry.get_sample_value("streamcl_overloaded") == 1
    lag[0] = None  # unknown: the judgement stands
    overload.refresh()
    assert overload.behind and metrics.registry.get_sample_value("streamcl_overloaded") == 1
    lag[0] = 0
    overload.refresh()
    assert not overload.behind and metrics.registry.get_sample_value("streamcl_overloaded") == 0


class Reassigned:
    """A consumer's view just after a rebalance: a partition it was given has no known end offset yet."""

    def __init__(self) -> None:
        self.owned, self.known = {("t", 0)}, {("t", 0): 1500}

    def assignment(self) -> set[tuple[str, int]]:
        return set(self.owned)

    def lag(self) -> dict[tuple[str, int], int]:
        return dict(self.known)


def test_a_partition_whose_lag_is_not_known_yet_does_not_read_as_caught_up() -> None:
    source = Reassigned()
    overload = OverloadPolicy("predict-only", max_lag=1000, resume_lag=500, lag=partial(known_lag, source))
    overload.refresh()
    assert overload.behind
    source.owned, source.known = {("t", 1)}, {}  # rebalanced: partition 1's end offset is being fetched
    overload.refresh()
    assert overload.behind  # read as lag 0, it would have learned everything from here on
    source.known = {("t", 1): 800}
    overload.refresh()
    assert overload.behind  # 800 is above resume_lag: still catching up
    source.owned, source.known = set(), {}  # no partitions: nothing to be behind on
    overload.refresh()
    assert not overload.behind
