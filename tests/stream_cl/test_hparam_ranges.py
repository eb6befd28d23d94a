"""Every numeric hyper-parameter of every method is checked finite and in range when the learner is built: a NaN
passes ``lr <= 0`` and an infinity passes ``lr > 0``, and either made every labelled record a dead letter."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_cl.build import build_learner
from stream_cl.cli import main
from stream_cl.methods import METHODS
from stream_cl.methods.common import require_number


def numeric_hyper_parameters(method: str) -> list[str]:
    """The keyword-only parameters typed int or float (optional or not) of ``method``'s constructors."""
    names: list[str] = []
    for cls in METHODS[method].__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(vars(cls)["__init__"]).parameters.values()
        names += [
            p.name
            for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and {"int", "float"} & set(str(p.annotation).split(" | "))
        ]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return names


CASES = [(method, name) for method in sorted(METHODS) for name in numeric_hyper_parameters(method)]


def build(method: str, **hparams: object):
    return build_learner(
        method, "mlp", (8,), np.dtype(np.float32), device=torch.device("cpu"), buffer_size=8, width=4, hparams=hparams
    )


def test_every_method_has_numeric_hyper_parameters_to_check() -> None:
    assert {method for method, _ in CASES} == set(METHODS)
    assert ("onpro-hle", "mixup_alpha") in CASES and ("pl-fms", "lr_warmup") in CASES


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("method", "name"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_a_non_finite_hyper_parameter_is_refused(method: str, name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be (a finite number|an integer), got -?(nan|inf)$"):
        build(method, **{name: bad})


@pytest.mark.parametrize(
    ("method", "hparams", "says"),
    [
        ("er", {"lr": 0.0}, "lr must be > 0, got 0.0"),
        ("er", {"iterations": 2.5}, "iterations must be an integer, got 2.5"),
        ("er", {"replay_batch_size": True}, "replay_batch_size must be an integer, got True"),
        ("er", {"lr": "fast"}, "lr must be a finite number, got 'fast'"),  # no TypeError from a comparison
        ("er-hle", {"lr_decay": 1.5}, "lr_decay must be > 0 and <= 1, got 1.5"),
        ("onpro", {"rotations": 3}, "rotations must be one of"),
        ("onpro", {"proj_dim": 5}, "proj_dim must be >= 1 and <= 4, got 5"),
        ("pl-fms", {"tau": 1.0}, "tau must be >= 0 and < 1, got 1.0"),
        ("pl-fms", {"batch_size": 3}, "batch_size must be even, got 3"),
    ],
)
def test_an_out_of_range_or_mistyped_hyper_parameter_is_refused(method: str, hparams: dict, says: str) -> None:
    with pytest.raises(ValueError, match=f"^{says}"):
        build(method, **hparams)


def test_numpy_numbers_are_numbers() -> None:
    require_number("iterations", np.int64(3), integer=True, ge=1)
    require_number("lr", np.float32(0.1), gt=0)


@pytest.mark.parametrize(
    ("method", "model", "hparam", "says"),
    [
        ("onpro", "resnet18-reduced", "lr=-1", "lr must be > 0, got -1"),
        ("onpro", "mlp", "proj_dim=300", "proj_dim must be >= 1 and <= 256, got 300"),
        ("pl-fms", "mlp", "tau=1.0", "tau must be >= 0 and < 1, got 1.0"),
    ],
)
def test_a_service_refuses_an_out_of_range_hyper_parameter_before_it_opens_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, model: str, hparam: str, says: str
) -> None:
    """The learner is built at the first record, which may come hours after a service reported ready: the
    source here does not exist, so only a check at start can name the hyper-parameter."""
    args = ["--source", str(tmp_path / "missing.rec.gz"), "--method", method, "--model", model, "--hparam", hparam]
    assert main(["serve", *args, "--metrics-port", "0", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 2
    assert says in capsys.readouterr().err


def test_a_worker_group_is_not_started_with_an_out_of_range_hyper_parameter(capsys: pytest.CaptureFixture) -> None:
    # nothing listens on port 1: a started group would fail there, not name the hyper-parameter
    args = ["--source", "kafka://127.0.0.1:1/t", "--workers", "2", "--hparam", "lr=0", "--metrics-port", "0"]
    assert main(["serve", *args]) == 2
    assert "lr must be > 0, got 0" in capsys.readouterr().err
