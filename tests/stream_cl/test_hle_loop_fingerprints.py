"""PL-FMS and ER-HLE share one training loop: their results on a fixed HLE stream are pinned.

The expected digests were recorded from the two methods' own loops before those were merged into
:mod:`stream_cl.methods.hle_loop`; any change to what either method learns changes them.
"""

from __future__ import annotations

import hashlib

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


def _fingerprint(method: str, hparams: dict) -> tuple[str, list[float | None]]:
    """SHA-256 of the model's state and of its predictions after the whole stream, and each observed loss."""
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
    digest = hashlib.sha256()
    for name, tensor in learner.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(learner.predict(torch.from_numpy(data.x[:16])).confidence.numpy().tobytes())
    return digest.hexdigest(), losses


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


RECORDED = {
    "er-hle": (
        "33e99cbdde4cd85f08ea0a633cee356cbce8fe662dee7ee4084b24fe95bf8ea2",
        [
            1.155782679716746,
            1.19863537285063,
            1.3986716667811077,
            1.4022639857398138,
            1.4336420098940532,
            1.4162195126215618,
            1.44444743792216,
            1.882786962721083,
            1.9139736890792847,
            1.9313210513856676,
            1.9963895479838054,
            2.02414772245619,
            2.0169973770777383,
        ],
    ),
    "er-hle-decay-cutmix": (
        "5cb7d81c61499b627a620ead32e1cdc895fe9f0c642eae667dca7b093755c823",
        [
            1.144998590151469,
            1.1917743285497029,
            1.3861864010492961,
            1.4055421087476943,
            1.4361966252326965,
            1.4381091727150812,
            1.417546013991038,
            1.863968637254503,
            1.9062630931536357,
            1.9234683911005657,
            2.006449739138285,
            2.02356219291687,
            2.0000704526901245,
        ],
    ),
    "pl-fms": (
        "4a36841b604c514e60816b09894254d7a73968838541040db6fe238eab58de4e",
        [
            1.1439966162045796,
            1.3549761109881928,
            1.885582764943441,
            2.3566166162490845,
            2.423816442489624,
            2.345727523167928,
            2.353549639383952,
            2.5901224083370633,
            2.653875072797139,
            2.8632485071818032,
            3.1680788199106855,
            2.9709406958685984,
            2.9799456993738813,
        ],
    ),
    "pl-fms-official-autoaugment": (
        "3e1521833b607936324c3daa54908fee662be46dceb482f459ff97e48dda3285",
        [
            1.1694788336753845,
            1.3825862275229561,
            1.8635511795679727,
            2.3057941595713296,
            2.2317376931508384,
            2.396337217754788,
            2.282047549883525,
            2.5323537985483804,
            2.667646249135335,
            2.491673151652018,
            2.6971225539843244,
            2.6951023737589517,
            2.5751729011535645,
        ],
    ),
    "pl-fms-ancestors-no-fms": (
        "6575e53810dcfd80833fc36f60f774ddf6445d7e6e5f170a165c93a04cd82dea",
        [
            1.1320289373397827,
            1.3808815744188099,
            2.1993584632873535,
            2.5613686773512097,
            2.618860801060994,
            2.3373710844251843,
            2.5770405928293867,
            3.0580025249057345,
            2.8997634649276733,
            3.163302262624105,
            3.1069931983947754,
            3.0823324786292186,
            3.0714677572250366,
        ],
    ),
}
"""Digest and observed losses of each case, from the methods' loops before they were merged."""


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_shared_loop_learns_exactly_what_each_method_learned_before(case: str) -> None:
    digest, losses = _fingerprint(*CASES[case])
    expected_digest, expected_losses = RECORDED[case]
    assert digest == expected_digest
    assert losses == pytest.approx(expected_losses, rel=1e-12)
