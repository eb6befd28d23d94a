"""Every registered method passes the learner contract suite (tests/contracts.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_cl.build import build_learner
from stream_cl.methods import METHODS
from tests import contracts

# Small cost settings so the suite stays fast; the methods' defaults are the papers'.
TINY_HPARAMS: dict[str, dict] = {
    "onpro": {"rotations": 4, "replay_cap": 16},
    "onpro-hle": {"rotations": 4, "replay_cap": 16},
    "pl-fms": {"online_iter": 1, "total_stream_length": 60},
    "er-hle": {"online_iter": 1},
}


def make(method: str, seed: int = 0):
    return build_learner(
        method,
        "resnet18-reduced",
        contracts.SHAPE,
        np.dtype(np.uint8),
        device=torch.device("cpu"),
        seed=seed,
        buffer_size=20,
        width=4,
        hparams=TINY_HPARAMS.get(method),
    )


CHECKS = [
    contracts.check_predict_before_observe,
    contracts.check_predict_is_pure,
    contracts.check_observe_predicts_before_learning,
    contracts.check_new_labels_mid_stream,
    contracts.check_a_first_batch_of_one_record_is_learned,
    contracts.check_unlabelled_records_are_not_learned,
    contracts.check_mixed_batch_learns_only_the_labelled,
]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_contract(method: str, check) -> None:
    check(make(method))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_round_trip(method: str) -> None:
    contracts.check_state_round_trip(make(method), make(method, seed=5))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_seed_same_run(method: str) -> None:
    first = contracts.run_all_seeded(lambda: make(method))
    second = contracts.run_all_seeded(lambda: make(method))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_poisoned_batch_is_refused(method: str) -> None:
    def make_float():
        return build_learner(
            method, "resnet18-reduced", (3, 8, 8), np.dtype(np.float32), device=torch.device("cpu"),
            buffer_size=20, width=4, hparams=TINY_HPARAMS.get(method),
        )  # fmt: skip

    contracts.check_poisoned_batch_is_refused(make_float, min_accuracy=None if method.startswith("onpro") else 0.9)
