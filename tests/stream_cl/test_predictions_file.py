"""The predictions file holds whole JSON lines only: a write the disk takes in part is cut back and counted as
lost, a rotated or deleted file is replaced, and a non-finite confidence is written as null (valid JSON)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.record import Message, Position, Record
from monitoring.metrics import Metrics
from stream_cl import predictions as predictions_module
from stream_cl.labels import LabelTree
from stream_cl.learner import Prediction
from stream_cl.predictions import FileSink, Predictions


def publish(predictions: Predictions, first: int, n: int, confidence: torch.Tensor | None = None) -> None:
    """Predictions for unlabelled records ``r<first>`` … ``r<first + n - 1>`` (class ``a``)."""
    tree = LabelTree()
    tree.encode([("a",)])
    records = []
    for i in range(first, first + n):
        message = Message(Position("in", 0, i), 0.0, None, b"")
        records.append(Record(f"r{i}", np.zeros(2, np.float32), None, message.position, 0.0, message))
    confidence = torch.full((n, 1), 0.9) if confidence is None else confidence
    predictions.publish(records, Prediction(torch.zeros(n, 1, dtype=torch.long), confidence), tree, time.monotonic())


def strict_lines(path: Path) -> list[dict]:
    """Every line of ``path`` as strict JSON (NaN and Infinity refused); fails on a partial or merged line."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    data = path.read_bytes()
    assert data.endswith(b"\n") or not data, data[-80:]
    return [json.loads(line, parse_constant=refuse) for line in data.decode().splitlines()]


def counts(metrics: Metrics) -> dict[str, float]:
    out = {"delivered": metrics.registry.get_sample_value("streamcl_predictions_total")}
    for reason in ("send_failed", "backing_off"):
        out[reason] = metrics.registry.get_sample_value("streamcl_predictions_failed_total", {"reason": reason})
    return out


class ShortWrites:
    """The sink's file, writing at most ``limits[i]`` bytes on its i-th write (None: all; -1: raise ENOSPC)."""

    def __init__(self, file: object, limits: list[int | None]) -> None:
        self.file, self.limits = file, limits

    def write(self, data: bytes) -> int:
        limit = self.limits.pop(0) if self.limits else None
        if limit == -1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data if limit is None else data[:limit])

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()


def test_a_write_the_disk_takes_in_part_is_cut_back_and_counted_lost(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    sink = FileSink(tmp_path / "p.jsonl")
    predictions = Predictions(sink, version=lambda: 0, metrics=metrics, retry_s=0)
    publish(predictions, 0, 2)
    sink._file = ShortWrites(sink._file, [20, -1])  # the disk fills up half-way through r2's line
    publish(predictions, 2, 1)
    assert counts(metrics) == {"delivered": 2, "send_failed": 1, "backing_off": 0}
    publish(predictions, 3, 1)  # space is back: r3 starts a line of its own
    assert [line["id"] for line in strict_lines(tmp_path / "p.jsonl")] == ["r0", "r1", "r3"]
    assert counts(metrics) == {"delivered": 3, "send_failed": 1, "backing_off": 0}
    predictions.close()


def test_short_writes_that_go_on_finish_the_line(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    sink = FileSink(tmp_path / "p.jsonl")
    sink._file = ShortWrites(sink._file, [7, 1, 30])  # each write takes a part, none fails
    publish(Predictions(sink, version=lambda: 0, metrics=metrics), 0, 2)
    sink.close()
    assert [line["id"] for line in strict_lines(tmp_path / "p.jsonl")] == ["r0", "r1"]
    assert counts(metrics)["delivered"] == 2


def test_the_file_size_limit_leaves_only_whole_lines_and_true_counts(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (in a child process) cuts a write short as a full disk does, with no error for its first part."""
    script = textwrap.dedent(
        f"""
        import json, resource
        from pathlib import Path
        from prometheus_client import CollectorRegistry
        from monitoring.metrics import Metrics
        from stream_cl.predictions import FileSink, Predictions
        from tests.stream_cl.test_predictions_file import counts, publish

        path = Path({str(tmp_path / "p.jsonl")!r})
        metrics = Metrics(CollectorRegistry())
        predictions = Predictions(FileSink(path), version=lambda: 0, metrics=metrics, retry_s=0)
        publish(predictions, 0, 5)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 30, hard))  # in the middle of r5's line
        publish(predictions, 5, 3)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        publish(predictions, 8, 2)
        print(json.dumps(counts(metrics)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == {"delivered": 7, "send_failed": 3, "backing_off": 0}
    assert [line["id"] for line in strict_lines(tmp_path / "p.jsonl")] == ["r0", "r1", "r2", "r3", "r4", "r8", "r9"]


def test_a_rotated_or_deleted_file_is_replaced_at_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predictions_module, "CHECK_PATH_S", 0.0)  # check on every record
    path = tmp_path / "p.jsonl"
    metrics = Metrics(CollectorRegistry())
    predictions = Predictions(FileSink(path), version=lambda: 0, metrics=metrics)
    publish(predictions, 0, 2)
    os.rename(path, tmp_path / "p.jsonl.1")  # logrotate's default: move away, the writer opens a new file
    publish(predictions, 2, 2)
    assert [line["id"] for line in strict_lines(tmp_path / "p.jsonl.1")] == ["r0", "r1"]
    assert [line["id"] for line in strict_lines(path)] == ["r2", "r3"]
    os.remove(path)
    publish(predictions, 4, 1)
    assert [line["id"] for line in strict_lines(path)] == ["r4"]
    assert counts(metrics)["delivered"] == 5
    predictions.close()


def test_the_path_is_checked_at_most_once_a_second_not_per_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.jsonl"
    predictions = Predictions(FileSink(path), version=lambda: 0)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (stats.append(p), real_stat(p, *a, **k))[1])
    started = time.monotonic()
    for first in range(0, 1000, 100):
        publish(predictions, first, 100)
    assert len([p for p in stats if Path(p) == path]) <= time.monotonic() - started + 1
    predictions.close()


def test_a_non_finite_confidence_is_written_as_null(tmp_path: Path) -> None:
    predictions = Predictions(FileSink(tmp_path / "p.jsonl"), version=lambda: 0)
    confidence = torch.tensor([[float("nan")], [float("inf")], [0.5]])
    publish(predictions, 0, 3, confidence)
    predictions.close()
    assert [line["confidence"] for line in strict_lines(tmp_path / "p.jsonl")] == [[None], [None], [0.5]]
