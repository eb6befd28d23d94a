"""The GPU run's script works end to end on CPU at toy sizes, and its peak table matches device names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_cl.bench.gpu_peaks import fraction_of_peak, peaks_for
from stream_cl.bench.gpu_report import markdown

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_runs_every_part_on_cpu_at_tiny_size(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        [str(ROOT / "benchmarks/gpu/run.sh"), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["machine"]["device"] == "cpu" and report["sizes"]["tiny"]
    assert report["notes"]  # says that AMP and graphs only take effect on CUDA
    by_case = {case["case"]: case for case in report["throughput"]}
    assert set(by_case) == {"er-resnet", "er-mlp", "onpro", "pl-fms"}
    for case in by_case.values():
        assert case["errors"] == {}
        assert all(row["samples_per_s"] > 0 and row["records"][0] > 0 for row in case["runs"].values())
    assert set(by_case["er-mlp"]["runs"]) == {
        "plain (a)", "learner eager", "learner graphed", "recorded eager (b)", "recorded graphed (b)",
    }  # fmt: skip
    assert set(by_case["onpro"]["runs"]) == {"learner float32", "learner AMP float16", "learner AMP bfloat16"}
    assert by_case["er-resnet"]["ratios"]["learner graphed / plain (a)"]["goal"] == 5.0
    assert [row["case"] for row in report["static_step"]] == ["er-resnet", "er-mlp"]
    assert all(row["eager"]["step_ms"] > 0 and "graphed" not in row for row in report["static_step"])
    (flops,) = report["onpro_flops"]
    assert flops["task"] == 1  # measured in a later task: APF and the replay prototypes are part of the step
    assert flops["gflop_per_step"] > 0 and flops["achieved_tflops"] > 0
    assert flops["card"] == "unknown" and flops["fraction_of_tensor_peak"] is None
    markdown = (tmp_path / "gpu.md").read_text()
    for heading in ("## Throughput", "## ER's learning step alone", "## OnPro's step in a later task"):
        assert heading in markdown


@pytest.mark.parametrize(
    ("name", "card"),
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce GTX 1080", "unknown"),
    ],
)
def test_peaks_are_found_by_device_name(name: str, card: str) -> None:
    assert peaks_for(name)[0] == card


def test_fraction_of_peak_uses_the_precision_s_tensor_rate() -> None:
    bf16 = fraction_of_peak(98.95, "NVIDIA H200", "bfloat16")
    assert bf16["tensor_peak_tflops"] == 989.5 and bf16["fraction_of_tensor_peak"] == pytest.approx(0.1)
    fp32 = fraction_of_peak(6.7, "NVIDIA H200", "float32")
    assert fp32["tensor_peak_tflops"] == 494.5 and fp32["fraction_of_fp32_peak"] == pytest.approx(0.1)
    assert fraction_of_peak(1.0, "Tesla T4", "bfloat16")["fraction_of_tensor_peak"] is None  # no bf16 on a T4


def test_the_report_renders_what_only_a_gpu_run_writes() -> None:
    """Graphed rows, the graph checks, AMP rows with card peaks and a failed part (the CPU run has none of them)."""
    row = {"samples_per_s": 5000.0, "records": [3000], "step_ms": {"p50": 2.0, "p95": 3.0, "p99": 4.0}}
    results = {
        "machine": {"device_name": "NVIDIA H200", "device": "cuda", "torch": "2.11", "cuda": "13.0", "python": "3.12"},
        "wall_s": 200.0,
        "sizes": {"tiny": False, "reps": 2},
        "notes": [],
        "failed_parts": {"flops": "RuntimeError: out of memory"},
        "throughput": [
            {
                "case": "er-mlp",
                "runs": {"plain (a)": row, "learner graphed": row},
                "ratios": {
                    "learner graphed / plain (a)": {"median": 1.0, "per_rep": [1.0], "goal": 10.0, "met": False}
                },
                "errors": {"recorded graphed (b)": "RuntimeError: capture failed\nmore"},
            }
        ],
        "static_step": [
            {
                "case": "er-mlp",
                "rows": 20,
                "eager": {"step_ms": 1.0},
                "graphed": {"step_ms": 0.1},
                "graphed / eager": 10.0,
                "graphed_matches_eager": {"ok": True, "max_abs_param_diff": 1e-7},
                "graphed_prediction_matches_eager": {"same_classes": True, "max_abs_confidence_diff": 0.0},
            }
        ],
        "onpro_flops": [
            {
                "precision": "bfloat16",
                "settings": {"model": "resnet18"},
                "step_ms": {"median": 50.0},
                "stream_samples_per_s": 200.0,
                "gflop_per_step": 500.0,
                "achieved_tflops": 10.0,
                **fraction_of_peak(10.0, "NVIDIA H200", "bfloat16"),
            }
        ],
    }
    text = markdown(results)
    assert "**Part flops failed**: RuntimeError: out of memory" in text
    assert "| er-mlp | recorded graphed (b) | failed: RuntimeError: capture failed |" in text
    assert "| er-mlp | learner graphed / plain (a) | 1.00 | 10.0 | no |" in text
    assert "| er-mlp | 20 | 1.000 | 0.100 | 10.0 | yes (max Δw 1.0e-07); prediction same classes" in text
    assert "| bfloat16 | 50.00 | 200.0 | 500.00 | 10.000 | H200 | 989.5 | 1.0 % | 14.9 % |" in text
    for line in text.splitlines():
        if line.startswith("| er-mlp | 20 |"):
            assert line.count("|") == 7  # no stray pipes inside the cells
