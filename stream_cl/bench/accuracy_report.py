"""The accuracy benchmark's report: JSON, markdown and two PNG plots."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # after choosing the Agg backend
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from stream_cl.bench.compute import ratio, times
from stream_cl.bench.provenance import provenance


def machine(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: CPU model and count, GPU name, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _pm(stat: dict[str, float | None], digits: int = 1) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(report: dict[str, Any], stem: str) -> str:
    p, m = report["protocol"], report["machine"]
    hw = m.get("gpu") or f"{m['cpu_count']}-core {m['cpu']} (no GPU)"
    lines = [
        f"# Accuracy benchmark: {stem}",
        "",
        f"Machine: {hw}, torch {m['torch']}, {m['threads']} threads, device `{report['device']}`.",
        f"Protocol: {p['dataset']}, first {p['classes']} classes in natural order, {p['tasks']} tasks, "
        f"{p['train_per_class'] or 'all'} training images per class, batch {p['batch_size']}, one pass, "
        f"memory M = {p['memory']}, model {p['model']} (nf = {p['width'] or 'default'}); "
        f"{report['runs']} runs (seeds differ in init, shuffling, buffer and method RNG).",
        f"Hyper-parameters beyond the defaults: {json.dumps(p['hparams'])}.",
        *([f"Note: {report['note']}."] if report.get("note") else []),  # e.g. how merged runs were made
        "",
        "| method | final accuracy (%) | forgetting (%, 1/(T−1)) | forgetting (%, OnPro code 1/T) "
        "| avg. incremental acc. (%) | wall s / run | CPU s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in report["methods"].items():
        s = res["summary"]
        lines.append(
            f"| {name} | {_pm(s['final_accuracy'])} | {_pm(s['forgetting'])} | {_pm(s['forgetting_code'])} "
            f"| {_pm(s['average_incremental_accuracy'])} | {_pm(s['seconds'], 0)} | {_pm(s['cpu_seconds'], 0)} |"
        )
    lines += ["", *compute_table(report["methods"])]
    lines += ["", "Mean ± sample std (ddof = 1) over runs. Accuracy matrices (row: after task i; column: task j):"]
    for name, res in report["methods"].items():
        mean, std = np.array(res["summary"]["matrix_mean"]), np.array(res["summary"]["matrix_std"])
        t = len(mean)
        lines += ["", f"**{name}**", "", "| after \\ task | " + " | ".join(map(str, range(t))) + " |"]
        lines.append("|---" * (t + 1) + "|")
        for i in range(t):
            cells = [f"{mean[i, j]:.1f} ± {std[i, j]:.1f}" if j <= i else "" for j in range(t)]
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", f"![accuracy matrix]({stem}_matrix.png)", "", f"![accuracy after each task]({stem}_tasks.png)", ""]
    return "\n".join(lines)


def compute_table(methods: dict[str, Any]) -> list[str]:
    """Markdown lines: each method's compute per run, absolute and relative to ``er``'s (means over runs)."""
    ref = methods.get("er", {}).get("summary", {})
    lines = [
        "Compute per run (×ER: relative to `er`'s mean). Learning CPU-s is the process CPU time inside `observe` "
        "(evaluation excluded); steps are optimizer steps taken.",
        "",
        "| method | optimizer steps | ×ER steps | learning CPU-s | ×ER CPU |",
        "|---|---|---|---|---|",
    ]
    for name, res in methods.items():
        s = res["summary"]
        steps, cpu = s.get("steps", _NONE), s.get("learn_cpu_seconds", _NONE)
        step_ratio = ratio(steps["mean"], ref.get("steps", _NONE)["mean"])
        cpu_ratio = ratio(cpu["mean"], ref.get("learn_cpu_seconds", _NONE)["mean"])
        lines.append(f"| {name} | {_pm(steps, 0)} | {times(step_ratio)} | {_pm(cpu, 0)} | {times(cpu_ratio)} |")
    return lines


_NONE = {"mean": None, "std": None}


def plot_matrices(report: dict[str, Any], path: Path) -> None:
    methods = report["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], methods.items(), strict=True):
        mean = np.array(res["summary"]["matrix_mean"])
        shown = np.where(np.tril(np.ones_like(mean)) > 0, mean, np.nan)
        im = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(mean):
            if j <= i and len(mean) <= 10:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w", fontsize=7)
        ax.set(
            title=name, xlabel="evaluated task", ylabel="after task", xticks=range(len(mean)), yticks=range(len(mean))
        )
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tasks_figure(report: dict[str, Any]) -> Figure:
    """Accuracy on the tasks seen so far after each task: mean ± sample std over runs; whole-task ticks."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, res in report["methods"].items():
        accs = np.array([[np.mean(row[: i + 1]) for i, row in enumerate(r["matrix"])] for r in res["runs"]])
        x = np.arange(1, accs.shape[1] + 1)
        ax.errorbar(x, accs.mean(0), yerr=accs.std(0, ddof=1) if len(accs) > 1 else None, marker="o", label=name)
    ax.set(xlabel="tasks seen", ylabel="accuracy on seen tasks (%)", ylim=(0, 100))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_tasks(report: dict[str, Any], path: Path) -> None:
    fig = tasks_figure(report)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, stem: str, report: dict[str, Any]) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md``, ``<stem>_matrix.png``, ``<stem>_tasks.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "provenance": provenance()}
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}_matrix.png", out / f"{stem}_tasks.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report, stem))
    plot_matrices(report, paths[2])
    plot_tasks(report, paths[3])
    return paths
