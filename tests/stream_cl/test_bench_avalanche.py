"""Path (d) of ``stream-cl bench throughput``: Avalanche's OnlineNaive + ReplayPlugin (optional ``[bench]`` extra).

CI does not install Avalanche: the runs are marked ``bench_extra`` and deselected by default (run them with
``pytest -m bench_extra`` in a venv with ``.[bench]``, where a missing Avalanche fails them); the
missing-package error is tested everywhere.
"""

from __future__ import annotations

import sys

import pytest
import torch

from stream_cl.bench.perf import avalanche
from stream_cl.bench.perf.data import Case, make_stream
from stream_cl.errors import StreamClError


def test_missing_avalanche_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "avalanche.training", None)  # makes the import fail
    case = Case("tiny", "er", "mlp", "features", n_records=20, n_classes=2, dim=4)
    with pytest.raises(StreamClError, match=r"pip install '\.\[bench\]'"):
        avalanche.run_avalanche_er(case, make_stream(case, None), torch.device("cpu"))
    assert "pip install" in (avalanche.available() or "")


@pytest.mark.bench_extra
@pytest.mark.parametrize(
    "case",
    [
        Case("tiny-mlp", "er", "mlp", "features", n_records=65, n_classes=3, dim=4, buffer_size=20),
        Case("tiny-resnet", "er", "resnet18-reduced", "images", n_records=30, n_classes=4, width=4, buffer_size=8),
    ],
    ids=lambda c: c.name,
)
def test_avalanche_takes_one_step_per_stream_batch(case: Case) -> None:
    torch.set_num_threads(1)
    times = avalanche.run_avalanche_er(case, make_stream(case, None), torch.device("cpu"))
    steps = -(-case.n_records // case.batch_size)
    assert len(times.durations) == steps
    assert times.sizes == [case.batch_size] * (steps - 1) + [case.n_records - (steps - 1) * case.batch_size]
    assert all(d > 0 for d in times.durations)
    assert "OnlineNaive" in avalanche.note()
