"""`stream-cl bench accuracy` on generated CIFAR-format files, and its task-level metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream_cl.bench import cl_metrics
from stream_cl.bench.accuracy import task_classes, task_indices
from stream_cl.bench.provenance import provenance
from stream_cl.cli import main


def fake_cifar(folder: Path, n_classes: int = 4, train: int = 20, test: int = 5) -> Path:
    """CIFAR-100-format npz parts with ``n_classes`` separable 8×8 colour classes."""
    rng = np.random.default_rng(0)

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(n_classes), per_class)
        x = rng.integers(0, 60, size=(len(y), 8, 8, 3)) + (y * 60)[:, None, None, None]
        return x.astype(np.uint8), y

    (x_tr, y_tr), (x_te, y_te) = split(train), split(test)
    half = len(y_tr) // 2
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        folder / "cifar100.part1.npz", x_train=x_tr[:half], y_train=y_tr[:half], y_train_coarse=0 * y_tr[:half]
    )
    np.savez_compressed(
        folder / "cifar100.part2.npz", x_train=x_tr[half:], y_train=y_tr[half:], y_train_coarse=0 * y_tr[half:],
        x_test=x_te, y_test=y_te, y_test_coarse=0 * y_te,
    )  # fmt: skip
    names = {"fine_label_names": [f"class{c}" for c in range(n_classes)], "coarse_label_names": ["all"]}
    (folder / "cifar100_label_map.json").write_text(json.dumps(names))
    return folder


def test_metrics_on_a_hand_made_matrix() -> None:
    a = np.array([[90.0, 0, 0], [60.0, 80.0, 0], [30.0, 70.0, 50.0]])
    assert cl_metrics.final_accuracy(a) == pytest.approx(50.0)
    assert cl_metrics.forgetting(a) == pytest.approx(((90 - 30) + (80 - 70)) / 2)
    assert cl_metrics.forgetting_code(a) == pytest.approx(((90 - 30) + (80 - 70) + 0) / 3)
    assert cl_metrics.average_incremental_accuracy(a) == pytest.approx((90 + 70 + 50) / 3)
    assert cl_metrics.forgetting(a[:1, :1]) is None
    assert cl_metrics.summarise([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5)}


def test_tasks_are_consecutive_classes_and_train_order_is_shuffled_within_tasks() -> None:
    assert [t.tolist() for t in task_classes(6, 3)] == [[0, 1], [2, 3], [4, 5]]
    y = np.repeat(np.arange(4), 5)
    idx = task_indices(y, np.array([2, 3]), 3, np.random.default_rng(0))
    assert sorted(idx.tolist()) == [10, 11, 12, 15, 16, 17]


def test_bench_accuracy_writes_a_report(tmp_path: Path) -> None:
    data = fake_cifar(tmp_path / "data")
    out = tmp_path / "report"
    args = ["bench", "accuracy", "--method", "onpro", "er", "--data-dir", str(data), "--classes", "4", "--tasks", "2"]
    args += ["--memory", "20", "--runs", "2", "--model", "resnet18-reduced", "--width", "4", "--rotations", "2"]
    args += ["--replay-cap", "8", "--hparam", "er.lr=0.1", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    stem = "cifar100-c4-t2-m20"
    assert {p.name for p in out.iterdir()} == {f"{stem}.json", f"{stem}.md", f"{stem}_matrix.png", f"{stem}_tasks.png"}
    report = json.loads((out / f"{stem}.json").read_text())
    assert report["provenance"] == provenance()
    assert report["protocol"]["hparams"] == {"onpro": {"rotations": 2, "replay_cap": 8}, "er": {"lr": 0.1}}
    for method in ("onpro", "er"):
        runs = report["methods"][method]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        for run in runs:
            matrix = np.array(run["matrix"])
            assert matrix.shape == (2, 2) and matrix[0, 1] == 0
            assert run["final_accuracy"] == pytest.approx(matrix[1].mean())
            assert run["forgetting"] == pytest.approx(matrix[0, 0] - matrix[1, 0], abs=0.01)
            assert run["forgetting_code"] == pytest.approx((matrix[:, 0].max() - matrix[1, 0]) / 2, abs=0.01)
    assert "| onpro |" in (out / f"{stem}.md").read_text()


def test_bench_accuracy_rejects_an_unknown_hparam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "accuracy", "--method", "er", "--data-dir", str(tmp_path), "--hparam", "rotations=4"]
    assert main(args) == 2
    assert "rotations" in capsys.readouterr().err


def test_a_tagged_variant_is_its_own_row_with_compute_relative_to_er(tmp_path: Path) -> None:
    data = fake_cifar(tmp_path / "data")
    args = ["bench", "accuracy", "--method", "er", "er:x3", "--hparam", "er:x3.iterations=3", "--data-dir", str(data)]
    args += ["--classes", "4", "--tasks", "2", "--memory", "20", "--runs", "2", "--model", "mlp", "--device", "cpu"]
    args += ["--out", str(tmp_path / "r"), "--name", "tagged", "--no-progress"]
    assert main(args) == 0
    report = json.loads((tmp_path / "r" / "tagged.json").read_text())
    assert report["protocol"]["hparams"] == {"er": {}, "er:x3": {"iterations": 3}}
    steps = {m: [r["steps"] for r in res["runs"]] for m, res in report["methods"].items()}
    assert steps == {"er": [8, 8], "er:x3": [24, 24]}  # 80 images in batches of 10, one or three steps each
    assert report["methods"]["er:x3"]["summary"]["learn_cpu_seconds"]["mean"] > 0
    assert "| er:x3 | 24 ± 0 | 3.0× |" in (tmp_path / "r" / "tagged.md").read_text()


def test_bench_accuracy_rejects_an_unknown_method(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "accuracy", "--method", "gem:x2", "--data-dir", "."])
    assert "expected METHOD[:TAG]" in capsys.readouterr().err
