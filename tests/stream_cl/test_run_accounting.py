"""Every consumed record has exactly one outcome, and the counts add up (this run and over restarts)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from consumers.record import Message, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.wire import encode_binary
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.checkpoint import CheckpointStore
from stream_cl.checkpointer import Checkpointer, restore
from stream_cl.overload import OverloadPolicy
from stream_cl.run import RunOptions, RunParts, run_stream
from stream_cl.summary import COUNTS, TOTALS, Summary
from tests.streams import blob_arrays

make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=16)


def _write(path: Path, rows: list[tuple[np.ndarray, str | None] | bytes]) -> Path:
    messages = []
    for offset, row in enumerate(rows):
        if isinstance(row, bytes):
            value, headers = row, ()
        else:
            value, headers = encode_binary(f"s{offset}", row[0], row[1])
        messages.append(Message(Position("s", 0, offset), float(offset), None, value, tuple(headers)))
    write_messages(path, messages)
    return path


def _balanced(summary: Summary) -> None:
    parts = sum(summary.count(name) for name in COUNTS if name != "consumed")
    assert summary.consumed == parts, summary


def _balanced_totals(summary: Summary) -> None:
    totals = {total: getattr(summary, total) for total in TOTALS.values()}
    assert totals[TOTALS["consumed"]] == sum(v for k, v in totals.items() if k != TOTALS["consumed"]), totals


def test_every_outcome_is_counted_once(tmp_path: Path) -> None:
    x, y = blob_arrays(n_classes=3, per_class=60, seed=4)
    rows: list = [(xi, f"c{int(yi)}") for xi, yi in zip(x, y, strict=True)]
    rows[5] = (x[5], None)  # predict only
    rows[17] = b"\xff not a record"  # decoder dead letter
    rows[30] = (np.zeros(3, dtype=np.float32), "c0")  # shape mismatch
    stream = _write(tmp_path / "s.rec.gz", rows)
    lag = [0]
    metrics = Metrics(CollectorRegistry())
    overload = OverloadPolicy("predict-only", max_lag=10, lag=lambda: lag[0], metrics=metrics)
    parts = RunParts(ProbeSet(fraction=0.2, seed=1), overload=overload)
    with RecordedSource(stream) as source:
        first, state = run_stream(
            source, make, metrics, RunOptions(batch_size=10, max_records=100, progress=False), parts
        )
        lag[0] = 50  # behind: the next labelled records are predicted, not learned
        second, _ = run_stream(source, make, metrics, RunOptions(batch_size=10, progress=False), parts, state=state)
    assert first.consumed == 100 and second.consumed == 80
    assert first.predicted == 1 and first.dead_letter == {"undecodable": 1, "shape_mismatch": 1}
    assert second.learned == 0 and second.overload_skipped > 0 and first.overload_skipped == 0
    assert first.held_out > 0 and second.held_out > 0
    for summary in (first, second):
        _balanced(summary)
        _balanced_totals(summary)
    counted = {o: metrics.registry.get_sample_value("streamcl_samples_total", {"outcome": o}) for o in COUNTS[1:]}
    assert sum(v or 0 for v in counted.values()) == 180  # the Prometheus outcomes add up to the records too


def test_classes_past_max_classes_are_dead_letters(tmp_path: Path) -> None:
    x, y = blob_arrays(n_classes=6, per_class=10, seed=2)
    stream = _write(tmp_path / "s.rec.gz", [(xi, f"c{int(yi)}") for xi, yi in zip(x, y, strict=True)])
    with RecordedSource(stream) as source:
        summary, state = run_stream(
            source, make, Metrics(CollectorRegistry()), RunOptions(batch_size=7, max_classes=4, progress=False)
        )
    assert state.learner.labels.sizes == [4]
    assert summary.learned == 40 and summary.dead_letter == {"too_many_classes": 20}
    _balanced(summary)


def test_a_refused_batch_is_dead_lettered_and_the_model_keeps_learning(tmp_path: Path) -> None:
    x, y = blob_arrays(n_classes=2, per_class=40, seed=3)
    rows: list = [(xi, f"c{int(yi)}") for xi, yi in zip(x, y, strict=True)]
    poison = x[45].copy()
    poison[0] = 3e38  # finite float32, but its loss is not
    rows[45] = (poison, "c1")
    stream = _write(tmp_path / "s.rec.gz", rows)
    with RecordedSource(stream) as source:
        summary, state = run_stream(
            source, make, Metrics(CollectorRegistry()), RunOptions(batch_size=10, progress=False)
        )
    assert summary.dead_letter == {"non_finite_loss": 10}  # the whole batch holding the poison is refused
    assert summary.learned == 70
    params = torch.cat([p.detach().flatten() for p in state.learner.model.parameters()])
    assert torch.isfinite(params).all()
    _balanced(summary)


def test_totals_add_up_across_a_restart_from_a_checkpoint(tmp_path: Path) -> None:
    x, y = blob_arrays(n_classes=3, per_class=40, seed=5)
    rows: list = [(xi, f"c{int(yi)}") for xi, yi in zip(x, y, strict=True)]
    for i in (7, 70):
        rows[i] = b"\xff not a record"
    rows[20] = (x[20], None)
    stream = _write(tmp_path / "s.rec.gz", rows)
    store, identity = CheckpointStore(tmp_path / "ckpt"), {"method": "er", "model": "mlp", "width": 16}

    def run(max_records: int | None) -> Summary:
        probe = ProbeSet(fraction=0.1, seed=0)
        state, restored = restore(store, make, identity, probe)
        checkpointer = Checkpointer(store, identity=identity, every_records=30, restored=restored, probe=probe)
        with RecordedSource(stream, start_offsets=restored.offsets if restored else None) as source:
            options = RunOptions(batch_size=10, max_records=max_records, progress=False)
            summary, _ = run_stream(
                source,
                make,
                Metrics(CollectorRegistry()),
                options,
                RunParts(probe, checkpointer=checkpointer),
                state=state,
            )
        return summary

    first, second = run(50), run(None)
    assert second.consumed_total == 120 == first.consumed + second.consumed
    assert second.learned_total == first.learned + second.learned > second.learned > 0
    assert second.dead_letter_total == 2 and second.predict_only_total == 1 and second.held_out_total > 0
    for summary in (first, second):
        _balanced(summary)
        _balanced_totals(summary)
