"""Benchmark reports: provenance in every JSON, and plots that can be read (no clipped lines, colliding
labels or fractional task ticks; seed spread shown)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import pyplot as plt

import stream_cl
from stream_cl.bench import accuracy_report, buffer_report, hle_report
from stream_cl.bench.perf import report as perf_report
from stream_cl.bench.provenance import git_commit, provenance

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHECKOUT = Path(stream_cl.__file__).resolve().parent.parent


def test_provenance_names_the_checked_out_commit_and_the_version() -> None:
    found = provenance()
    assert found["stream_cl_version"] == stream_cl.__version__
    assert re.fullmatch(r"[0-9a-f]{40}", found["git_commit"])
    kind = subprocess.run(["git", "cat-file", "-t", found["git_commit"]], cwd=CHECKOUT, capture_output=True, text=True)
    assert kind.stdout.strip() == "commit"


def test_no_commit_outside_a_checkout_or_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    assert git_commit() is None


def test_memory_plot_keeps_a_flat_line_off_the_frame(tmp_path: Path) -> None:
    memory = {"records": 3000, "trace": {"records": [0, 1000, 2000, 3000], "rss_mib": [470.0, 480.0, 480.5, 480.5]}}
    fig = perf_report.memory_figure(memory)
    bottom, top = fig.axes[0].get_ylim()
    plt.close(fig)
    assert bottom == 0 and top >= 1.1 * 480.5
    assert perf_report.plot_memory(memory, tmp_path).read_bytes()[:8] == PNG_MAGIC


def test_throughput_json_records_provenance(tmp_path: Path) -> None:
    doc = json.loads(perf_report.write_json({"cases": []}, tmp_path).read_text())
    assert doc["provenance"] == provenance()


def _buffer_rows() -> list[dict[str, float | int | str]]:
    rows = []
    for policy in ("reservoir", "class-balanced"):
        for backend in ("memory", "redis"):
            for capacity in (2000, 20000):
                rows.append(
                    {"backend": backend, "policy": policy, "capacity": capacity, "inserts_per_s": 5e4,
                     "samples_per_s": 2e5, "sample_calls_per_s": 2e3, "steps_per_s": 1e3, "round_trips_per_step": 1.0,
                     "steps_per_s_two_calls": 8e2, "round_trips_per_step_two_calls": 2.0, "bytes_per_sample": 3100}
                )  # fmt: skip
    return rows


def test_buffer_plot_tick_labels_do_not_overlap(tmp_path: Path) -> None:
    fig = buffer_report.throughput_figure(_buffer_rows())
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = ax.get_xticklabels()
    xs = ax.transData.transform([(t, 1.0) for t in ax.get_xticks()])[:, 0]
    figure_box = fig.bbox
    # Parallel labels rotated by θ lie on lines whose distance is the tick spacing times sin θ; they
    # are apart when that exceeds a line of text. Each label must also fit inside the figure.
    gap = np.diff(xs).min() * np.sin(np.radians(labels[0].get_rotation()))
    line_px = 1.2 * labels[0].get_size() * fig.dpi / 72
    inside = [figure_box.x0 <= b.x0 and b.y0 >= figure_box.y0 for b in (la.get_window_extent() for la in labels)]
    plt.close(fig)
    assert len(labels) == 8 and all(la.get_rotation() == 30 for la in labels)
    assert gap > line_px and all(inside)

    settings = {"repeats": 3, "calls": 10, "batch": 10, "replay": 10}
    buffer_report.write_report(tmp_path, settings, _buffer_rows())
    assert json.loads((tmp_path / "results.json").read_text())["provenance"] == provenance()
    assert (tmp_path / "throughput.png").read_bytes()[:8] == PNG_MAGIC


def _hle_runs(seeds: int) -> list[dict]:
    rng = np.random.default_rng(0)
    runs = []
    for method in ("er", "pl-fms"):
        for seed in range(seeds):
            curve = [[x, float(rng.uniform(0.1, 0.5))] for x in (20, 40, 60)]
            level = {"curve": curve, "A_auc": 0.3, "A_last": curve[-1][1], "F_last": 0.1, "A_last_head_only": 0.2}
            runs.append({"method": method, "seed": seed, "seconds": 1.0, "levels": {"0": level}})
    return runs


def test_hle_curves_show_the_sample_std_over_seeds_as_a_band(tmp_path: Path) -> None:
    runs = _hle_runs(3)
    fig = hle_report.accuracy_figure(runs, "single")
    bands = fig.axes[0].collections
    assert len(bands) == 2  # one per method
    er = 100 * np.array([[a for _, a in r["levels"]["0"]["curve"]] for r in runs if r["method"] == "er"])
    low, high = er.mean(0) - er.std(0, ddof=1), er.mean(0) + er.std(0, ddof=1)
    band_y = bands[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() == pytest.approx(low.min()) and band_y.max() == pytest.approx(high.max())
    plt.close(fig)
    single_seed = hle_report.accuracy_figure(_hle_runs(1), "single")
    assert not single_seed.axes[0].collections  # no spread to show with one seed
    plt.close(single_seed)

    protocol = {"setup": "single", "runs": 3, "per_class": 2, "test_per_class": 1, "model": "mlp", "width": None,
                "buffer_size": 20, "batch_size": 4, "online_iter": 1, "imp_update_period": 10, "eval_period": 20,
                "onpro_rotations": None, "onpro_replay_cap": None, "device": "cpu", "stream_length": 60,
                "threads": 1}  # fmt: skip
    hle_report.write_report(tmp_path, protocol, runs)
    assert json.loads((tmp_path / "results.json").read_text())["provenance"] == provenance()
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == PNG_MAGIC


def _accuracy_report(tasks: int) -> dict:
    stat = {"mean": 50.0, "std": 5.0}
    matrix = np.tril(np.full((tasks, tasks), 60.0)).tolist()
    summary = {key: stat for key in ("final_accuracy", "forgetting", "forgetting_code", "average_incremental_accuracy",
                                     "seconds", "cpu_seconds")}  # fmt: skip
    summary |= {"matrix_mean": matrix, "matrix_std": np.zeros((tasks, tasks)).tolist()}
    runs = [{"seed": s, "matrix": (np.array(matrix) - s).tolist()} for s in range(2)]
    return {
        "protocol": {"dataset": "cifar100", "classes": 10, "tasks": tasks, "train_per_class": None, "batch_size": 10,
                     "memory": 100, "model": "mlp", "width": None, "hparams": {}},
        "machine": {"cpu": "test CPU", "cpu_count": 2, "torch": "x", "threads": 1},
        "device": "cpu",
        "runs": 2,
        "methods": {"er": {"summary": summary, "runs": runs}},
    }  # fmt: skip


def test_task_plot_has_whole_task_ticks_and_the_report_records_provenance(tmp_path: Path) -> None:
    fig = accuracy_report.tasks_figure(_accuracy_report(5))
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 5]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks)

    paths = accuracy_report.write_report(tmp_path, "r", _accuracy_report(5))
    assert json.loads(paths[0].read_text())["provenance"] == provenance()
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths[2:])


def test_an_accuracy_report_shows_how_merged_runs_were_made() -> None:
    """A report merged from runs on two machines says so under its machine line, which names only one."""
    report = _accuracy_report(5)
    assert "Note:" not in accuracy_report.markdown(report, "r")
    report["note"] = "er:x10 ran on another machine"
    lines = accuracy_report.markdown(report, "r").splitlines()
    assert "Note: er:x10 ran on another machine." in lines[:6]
