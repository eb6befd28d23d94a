"""Report of ``stream-cl bench buffer``: results.json, README.md and throughput.png."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from stream_cl.bench.provenance import provenance


def machine() -> str:
    """CPU model and core count, e.g. ``AMD EPYC, 2 cores, Linux x86_64``."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, no GPU used"


def write_report(out: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in settings.items() if k != "handler"}
    meta = {
        "machine": machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    doc = {"meta": meta, "provenance": provenance(), "settings": settings, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    fig = throughput_figure(rows)
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)
    (out / "README.md").write_text(_markdown(meta, settings, rows))


def _markdown(meta: dict[str, Any], settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    server = settings.get("redis_server") or {}
    lines = [
        "# Replay buffer benchmark (`stream-cl bench buffer`)",
        "",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}"
        + (f", redis-server {server['version']} (redis-py {server['redis_py']}) on loopback" if server else "")
        + (", AOF fsync everysec" if settings.get("aof") else ", no persistence")
        + f". Client and server share the cores with other jobs (1-minute load average {meta['load_average_1m_at_end']}"
        " at the end of the run), so figures vary between runs; each is the best of "
        f"{settings['repeats']} runs of {settings['calls']} calls.",
        "",
        f"Samples are 3x32x32 uint8 (3,072 bytes). Inserts come in micro-batches of {settings['batch']}, draws are "
        f"`sample({settings['replay']})`, timed on a full buffer. A learner "
        f"step is `sample_then_add({settings['replay']}, batch)`; the two-call form is `sample` then `add`. "
        "Round trips are counted on the redis-py connection (one per packed send). Bytes per sample: the growth "
        "of Redis `used_memory` while filling, divided by the buffer size (memory: payload + labels).",
        "",
        "| backend | policy | capacity | inserts/s | samples/s | draws/s | steps/s | round trips/step "
        "| steps/s, 2 calls | round trips, 2 calls | bytes/sample |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['policy']} | {r['capacity']:,} | {r['inserts_per_s']:,.0f} "
            f"| {r['samples_per_s']:,.0f} "
            f"| {r['sample_calls_per_s']:,.0f} | {r['steps_per_s']:,.0f} | {r['round_trips_per_step']:.2f} "
            f"| {r['steps_per_s_two_calls']:,.0f} | {r['round_trips_per_step_two_calls']:.2f} "
            f"| {r['bytes_per_sample']:,.0f} |"
        )
    lines += ["", "![throughput](throughput.png)", ""]
    return "\n".join(lines)


def throughput_figure(rows: list[dict[str, Any]]) -> Figure:
    """Grouped bars per store; one-line labels, rotated, so long policy names do not run into each other."""
    names = [f"{r['backend']} {r['policy']} M={r['capacity']:,}" for r in rows]
    series = [("inserts/s", "inserts_per_s"), ("samples/s", "samples_per_s"), ("steps/s x10", "steps_per_s")]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rows)), 4.6))
    width = 0.8 / len(series)
    for k, (label, key) in enumerate(series):
        values = [r[key] * (10 if key == "steps_per_s" else 1) for r in rows]
        ax.bar([i + k * width for i in range(len(rows))], values, width, label=label)
    ticks = [i + width * (len(series) - 1) / 2 for i in range(len(rows))]
    ax.set_xticks(ticks, names, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("per second (log)")
    ax.set_title("Replay stores, 3x32x32 uint8 samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
