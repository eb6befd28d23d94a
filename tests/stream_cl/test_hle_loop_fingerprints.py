"""PL-FMS and ER-HLE share one training loop: their results on a fixed HLE stream are pinned.

The expected figures were recorded from the two methods' own loops before those were merged into
:mod:`stream_cl.methods.hle_loop` (where a SHA-256 of the bytes matched exactly); they are compared with
a tolerance, as another CPU's kernels may round differently, so a change to what either method learns
shows and a different rounding does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from consumers.datasets import LabelledArrays
from consumers.hle import build
from stream_cl.build import build_learner
from stream_cl.learner import Batch


def _stream() -> tuple[LabelledArrays, list]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 8)
    data = LabelledArrays(
        x=rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8), y=y, fine_names=tuple(f"f{c}" for c in range(8)),
        y_coarse=y // 2, coarse_names=tuple(f"c{c}" for c in range(4)),
    )  # fmt: skip
    return data, build("single", data, seed=0, child_tasks=2)


def _fingerprint(method: str, hparams: dict) -> tuple[list[float], list[float | None]]:
    """Sum and absolute sum of each model tensor and the predictions' confidences after the whole
    stream, and each observed loss."""
    data, stream = _stream()
    torch.manual_seed(0)
    learner = build_learner(
        method, "mlp", (8, 8, 3), np.dtype("uint8"), device=torch.device("cpu"), buffer_size=10, width=16,
        hparams={"batch_size": 4, "online_iter": 1.5, "seed": 3, **hparams},
    )  # fmt: skip
    losses = []
    for i in range(0, len(stream), 5):  # 5 at a time: temporary batches of 2 straddle the observed batches
        rows = stream.rows[i : i + 5]
        losses.append(learner.observe(Batch(torch.from_numpy(data.x[rows]), list(stream.paths[i : i + 5]))).stats.loss)
    figures = []
    for tensor in learner.model.state_dict().values():
        t = tensor.detach().double()
        figures += [t.sum().item(), t.abs().sum().item()]
    figures += learner.predict(torch.from_numpy(data.x[:16])).confidence.double().reshape(-1).tolist()
    return figures, losses


CASES = {
    "er-hle": ("er-hle", {}),
    "er-hle-decay-cutmix": ("er-hle", {"lr_decay": 0.99, "cutmix_prob": 1.0}),
    "pl-fms": (
        "pl-fms",
        {"total_stream_length": 64, "imp_update_period": 2, "lr_period": 2, "lr_length": 2, "lr_warmup": 1, "tau": 0.2},
    ),
    "pl-fms-official-autoaugment": (
        "pl-fms",
        {
            "total_stream_length": 64,
            "imp_update_period": 1,
            "adaptive_lr_schedule": "official",
            "lr_period": 1,
            "lr_length": 2,
            "lr_warmup": 0,
            "autoaugment": True,
            "pseudo_in_importance": True,
            "tau": 0.2,
        },
    ),
    "pl-fms-ancestors-no-fms": ("pl-fms", {"total_stream_length": 64, "train_ancestors": True, "fms": False}),
}


RECORDED = json.loads((Path(__file__).parents[1] / "data" / "hle_loop_figures.json").read_text())
"""Figures and observed losses of each case, from the methods' loops before they were merged."""


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_shared_loop_learns_exactly_what_each_method_learned_before(case: str) -> None:
    figures, losses = _fingerprint(*CASES[case])
    assert figures == pytest.approx(RECORDED[case]["figures"], rel=1e-5, abs=1e-6)
    assert losses == pytest.approx(RECORDED[case]["losses"], rel=1e-5)
