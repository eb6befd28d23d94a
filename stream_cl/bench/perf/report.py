"""The throughput report: machine description, JSON, markdown and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from stream_cl.bench.perf import kafka_clients
from stream_cl.bench.provenance import provenance

PATH_LABELS = {
    "a": "(a) plain PyTorch loop",
    "learner": "learner.observe alone",
    "b": "(b) recorded file → run loop",
    "b+prefetch": "(b) + prefetch thread",
    "b-batched10": "(b) with 10 samples per recorded message (wire format 2)",
    "b-batched100": "(b) with 100 samples per recorded message (wire format 2)",
    "c": "(c) Kafka → run loop, Redis buffer, metrics, drift, checkpoints",
    **kafka_clients.LABELS,
    "c-batched10": "(c) with 10 samples per Kafka message (wire format 2)",
    "c-batched100": "(c) with 100 samples per Kafka message (wire format 2)",
    "d": "(d) Avalanche OnlineNaive + ReplayPlugin",
}


def _ordered(paths: dict[str, Any]) -> list[str]:
    """Path names in report order (JSON keeps them sorted)."""
    return sorted(paths, key=lambda name: list(PATH_LABELS).index(name) if name in PATH_LABELS else len(PATH_LABELS))


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    lscpu = ""
    if shutil.which("lscpu"):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    keep = ("Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket", "Hypervisor vendor")
    cpu = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines()) if k in keep}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_json(result: dict[str, Any], out: Path) -> Path:
    path = out / "throughput.json"
    path.write_text(json.dumps({**result, "provenance": provenance()}, indent=1, sort_keys=True) + "\n")
    return path


def plot_throughput(result: dict[str, Any], out: Path) -> Path:
    cases = result["cases"]
    fig, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 6.4), squeeze=False)
    for col, case in enumerate(cases):
        names = _ordered(case["paths"])
        for row, (key, label) in enumerate(
            (("samples_per_second", "samples/s"), ("samples_per_cpu_second", "per CPU-s"))
        ):
            ax = axes[row][col]
            ax.bar(
                range(len(names)), [case["paths"][p][key] for p in names], color="#4c72b0" if row == 0 else "#55a868"
            )
            if row == 0:
                for i, p in enumerate(names):
                    values = case["paths"][p]["samples_per_second_reps"]
                    ax.plot([i] * len(values), values, "k.", markersize=4)
                ax.set_title(case["case"]["name"], fontsize=10)
            ax.set_xticks(range(len(names)), names if row == 1 else [""] * len(names), rotation=30, ha="right")
            ax.set_ylabel(label)
    fig.suptitle("bars: median of repetitions; dots: each repetition (wall clock)", fontsize=9)
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_latency(result: dict[str, Any], out: Path) -> Path:
    cases = result["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        names = _ordered(case["paths"])
        pct = [case["paths"][p]["step_latency_ms"] for p in names]
        for q, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ax.plot(range(len(names)), [p.get(q, 0.0) for p in pct], marker, label=q)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(case["case"]["name"], fontsize=10)
        ax.set_ylabel("learner step latency (ms)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def memory_figure(memory: dict[str, Any]) -> Figure:
    """RSS over records polled, from 0 MiB with headroom above the peak so a flat line stays off the frame."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    rss = memory["trace"]["rss_mib"]
    ax.plot(memory["trace"]["records"], rss, "-", color="#c44e52")
    ax.set_xlabel("records polled")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, 1.15 * max(rss, default=1.0) or 1.0)
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(alpha=0.3)
    ax.set_title(f"ER + MLP on {memory['records']:,} synthetic records: RSS", fontsize=10)
    fig.tight_layout()
    return fig


def plot_memory(memory: dict[str, Any], out: Path) -> Path:
    fig = memory_figure(memory)
    path = out / "memory_rss.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def write_markdown(result: dict[str, Any], out: Path) -> Path:
    m = result["machine"]
    cpu = m["cpu"]
    lines = [
        "# stream-cl throughput benchmark",
        "",
        f"Written by `{result['command']}`. Numbers come from this run only.",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu.get('Model name', '?')} ({cpu.get('Architecture', '?')}), {m['cpu_count']} logical CPUs"
        f"{', ' + cpu['Hypervisor vendor'] + ' VM' if cpu.get('Hypervisor vendor') else ''}",
        f"- Python {m['python']}, torch {m['torch']}, {m['torch_threads']} intra-op thread(s), device `{m['device']}`",
        f"- GPU: {m['gpu'] or 'none on this machine: no GPU numbers were measured'}",
        f"- Load average before / after: {result['load_before']} / {result['load_after']}",
        f"- {result['shared_note']}",
        "",
        "## How it is measured",
        "",
        *[f"- {line}" for line in result["method_notes"]],
        "",
        "## Results",
        "",
    ]
    for case in result["cases"]:
        c = case["case"]
        lines += [
            f"### {c['name']}: {c['method']} on {c['model']}",
            "",
            f"Stream: {case['stream']}; {c['n_records']} records per run, stream batch {c['batch_size']}, "
            f"replay batch {c['replay_batch_size']}, buffer {c['buffer_size']}; "
            f"{case['reps']} interleaved repetitions.",
            "",
            "| path | samples/s | samples/s (mean over window) | samples per CPU-s | step p50 ms | p95 ms | p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in _ordered(case["paths"]):
            p = case["paths"][name]
            lat = p["step_latency_ms"]
            lines.append(
                f"| {PATH_LABELS.get(name, name)} | {_fmt(p['samples_per_second'])}"
                f" | {_fmt(p['mean_samples_per_second'])} | {_fmt(p['samples_per_cpu_second'])}"
                f" | {lat.get('p50', 0):.2f} | {lat.get('p95', 0):.2f} | {lat.get('p99', 0):.2f} |"
            )
        lines += [
            "",
            "| ratio | wall-clock (median) | each repetition | CPU-time (median) | each repetition | goal |",
            "|---|---:|---|---:|---|---|",
        ]
        for name, r in sorted(
            case["ratios"].items(), key=lambda kv: _ordered(case["paths"]).index(kv[0].split("/")[0])
        ):
            each = ", ".join(f"{v:.3f}" for v in r["reps"])
            cpu_each = ", ".join(f"{v:.3f}" for v in r["cpu_reps"])
            lines.append(
                f"| {name} | {r['median']:.3f} | {each} | {r['cpu_median']:.3f} | {cpu_each} | {r.get('goal', '')} |"
            )
            if "cpu_with_services_median" in r:
                lines.append(
                    f"| {name}, CPU of broker + Redis included | | | {r['cpu_with_services_median']:.3f} | | |"
                )
        if case.get("notes"):
            lines += ["", *[f"- {n}" for n in case["notes"]]]
        lines.append("")
    mem = result.get("memory")
    if mem:
        lines += [
            "## Memory: long run",
            "",
            f"ER + MLP (8-d float32 vectors from `consumers.synthetic.SyntheticSource`, stream batch "
            f"{mem['batch_size']}, buffer 500, probe 5 %): {mem['records']:,} records in {mem['seconds']:.0f} s "
            f"({_fmt(mem['records_per_second'])} records/s).",
            "",
            f"- RSS before the learner was built: {mem['rss_start_mib']:.1f} MiB",
            f"- RSS after the first {mem['trace']['records'][1]:,} records: "
            f"{mem['rss_after_first_sample_mib']:.1f} MiB",
            f"- RSS at the end: {mem['rss_end_mib']:.1f} MiB (peak {mem['rss_peak_mib']:.1f} MiB)",
            f"- growth over the second half of the run: {mem['rss_growth_second_half_mib']:+.2f} MiB",
            "",
            "![RSS over records](memory_rss.png)",
            "",
        ]
    lines += ["## Plots", "", "![throughput](throughput.png)", "", "![latency](latency.png)", ""]
    if result.get("avalanche"):
        lines += ["## Avalanche", "", result["avalanche"], ""]
    lines += [
        "## Several workers",
        "",
        "Records per second of one worker and of a group learning one model (`serve --workers`), with the",
        "cost of the synchronisation per step: `stream-cl bench scaleout`, report in",
        "[`../scaleout/`](../scaleout/README.md).",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
