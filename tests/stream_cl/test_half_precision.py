"""Every method's losses stay finite and close to float32 in reduced precision (AMP on a GPU runs them so).

CPU autocast with float16 reproduces what CUDA autocast does to these losses (float16 matmuls, so
float16 similarity matrices, masks and exponentials); float16/bfloat16 inputs stand for a
reduced-precision forward's outputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from stream_cl.build import build_learner
from stream_cl.heads import hierarchical_ce
from stream_cl.learner import Batch
from stream_cl.methods.onpro_losses import class_keys, contrast_groups, ins_loss, ins_similarity, mixup_ce, proto_loss
from stream_cl.methods.pl_fms_losses import parent_pseudo_loss, per_sample_ce

HALVES = [torch.float16, torch.bfloat16]


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = 16
    y = torch.arange(n) % 4
    level = torch.tensor([0, 1] * (n // 2))
    return {
        "z": F.normalize(torch.randn(2 * n, 32, generator=gen), dim=1),
        "h": F.normalize(torch.randn(2 * n, 64, generator=gen), dim=1),
        "keys": class_keys(torch.zeros(n, dtype=torch.long), y),
        "y": y,
        "level": level,
        "lam": torch.rand(n, generator=gen),
        "flat": [torch.randn(n, 4, generator=gen) * 8],
        "tree": [torch.randn(n, 4, generator=gen) * 8, torch.randn(n, 6, generator=gen) * 8],
    }


def _ins(t: dict, cast: Callable, stream: bool) -> torch.Tensor:
    n = t["keys"].shape[0]
    groups = contrast_groups(t["keys"], t["keys"], torch.zeros(n), 1).repeat(2)
    sim = ins_similarity(cast(t["z"]), cast(t["h"]), 8, 1.0)
    return ins_loss(sim, groups, temperature=0.07, stream=stream)


LOSSES: dict[str, Callable[[dict, Callable], torch.Tensor]] = {
    "onpro ins stream": lambda t, c: _ins(t, c, stream=True),
    "onpro ins replay": lambda t, c: _ins(t, c, stream=False),
    "onpro proto": lambda t, c: proto_loss(c(t["z"][:16]), c(t["z"][16:]), t["keys"], temperature=0.5)[0],
    "onpro mixup ce": lambda t, c: mixup_ce([c(x) for x in t["tree"]], t["keys"], t["keys"].flip(0), t["lam"]),
    "er ce flat": lambda t, c: hierarchical_ce([c(x) for x in t["flat"]], t["y"], torch.zeros_like(t["y"])),
    "er ce tree": lambda t, c: hierarchical_ce([c(x) for x in t["tree"]], t["y"], t["level"]),
    "pl-fms per-sample ce": lambda t, c: per_sample_ce([c(x) for x in t["tree"]], t["y"], t["level"]).sum(),
    "pl-fms pseudo": lambda t, c: parent_pseudo_loss([c(x) for x in t["tree"]], t["level"], 0.2, 1.0).sum(),
}


def _run(name: str, cast: Callable, context: contextlib.AbstractContextManager) -> tuple[float, list[torch.Tensor]]:
    t = _inputs()
    leaves = [t["z"], t["h"], *t["flat"], *t["tree"]]
    for leaf in leaves:
        leaf.requires_grad_(True)
    with context:
        loss = LOSSES[name](t, cast)
    loss.backward()
    return float(loss.detach()), [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad.float() for leaf in leaves]


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_under_cpu_autocast_match_float32(name: str, dtype: torch.dtype) -> None:
    reference, reference_grads = _run(name, lambda x: x, contextlib.nullcontext())
    value, grads = _run(name, lambda x: x, torch.autocast("cpu", dtype=dtype))
    assert math.isfinite(value)
    assert value == pytest.approx(reference, rel=1e-4, abs=1e-5)
    for grad, ref in zip(grads, reference_grads, strict=True):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_of_half_precision_tensors_are_finite_and_near_float32(name: str, dtype: torch.dtype) -> None:
    reference, _ = _run(name, lambda x: x, contextlib.nullcontext())
    value, grads = _run(name, lambda x: x.to(dtype), contextlib.nullcontext())
    assert math.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)
    # Only the inputs are rounded (bfloat16: 8 mantissa bits, then amplified by 1/τ = 14 in the contrast).
    assert value == pytest.approx(reference, rel=0.05 if dtype == torch.bfloat16 else 0.01, abs=1e-3)


def test_onpro_learns_under_float16_autocast() -> None:
    """The whole OnPro step (task 0, then APF mixing and the replay prototypes) under float16 autocast."""
    learner = build_learner(
        "onpro", "resnet18-reduced", (8, 8, 3), np.dtype(np.uint8), device=torch.device("cpu"),
        seed=0, buffer_size=30, width=4, hparams={"rotations": 2, "replay_cap": 8, "task_grace": 1},
    )  # fmt: skip
    rng = np.random.default_rng(0)
    losses = []
    for labels in [["a", "b"]] * 3 + [["c", "d"]] * 3:
        x = torch.from_numpy(rng.integers(0, 255, size=(10, 8, 8, 3), dtype=np.uint8))
        with torch.autocast("cpu", dtype=torch.float16):
            observation = learner.observe(Batch(x, [(labels[i % 2],) for i in range(10)]))
        assert observation.stats.rejected is None
        losses.append(observation.stats.loss)
    assert learner.task == 1
    assert all(math.isfinite(v) for v in losses)


def test_onpro_amp_dtype_is_checked_and_bfloat16_needs_no_scaler() -> None:
    def make(amp_dtype: str) -> object:
        return build_learner(
            "onpro", "resnet18-reduced", (8, 8, 3), np.dtype(np.uint8), device=torch.device("cpu"),
            width=4, hparams={"amp_dtype": amp_dtype},
        )  # fmt: skip

    with pytest.raises(ValueError, match="amp_dtype must be float16 or bfloat16"):
        make("float64")
    learner = make("bfloat16")
    assert learner.amp_dtype == torch.bfloat16
    assert not learner.amp  # CPU steps run in float32: the switch only takes effect on CUDA
    assert not learner.scaler.is_enabled()
