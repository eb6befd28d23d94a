"""Report of ``stream-cl bench scaleout``: results.json, README.md and scaleout.png."""

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

from stream_cl.bench.buffer_report import machine
from stream_cl.bench.provenance import provenance

MODEL_NAMES = {"mlp": "MLP", "resnet18-reduced": "reduced ResNet-18"}


def write_report(out: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in settings.items() if k not in ("handler", "benchmark", "redis")}
    gpu = settings["device"] == "cuda" and torch.cuda.is_available()
    meta = {
        "machine": machine().replace("no GPU used", torch.cuda.get_device_name(0)) if gpu else machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backend": "nccl" if gpu else "gloo",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    doc = {"meta": meta, "provenance": provenance(), "settings": settings, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    fig = figure(rows)
    fig.savefig(out / "scaleout.png", dpi=90)
    plt.close(fig)
    (out / "README.md").write_text(markdown(meta, settings, rows))


def command(settings: dict[str, Any]) -> str:
    parts = ["stream-cl bench scaleout", "--models", *settings["models"], "--stride", *map(str, settings["stride"])]
    parts += ["--workers", *map(str, settings["workers"]), "--average-every", *map(str, settings["average_every"])]
    parts += ["--repeats", str(settings["repeats"])]
    if settings["device"] != "cpu":
        parts += ["--device", settings["device"]]
    return " ".join(parts)


def markdown(meta: dict[str, Any], settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Scale-out: one worker and groups of workers (`stream-cl bench scaleout`)",
        "",
        f"Command: `{command(settings)}`",
        "",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, backend {meta['backend']}. "
        "Every worker is a process with one intra-op thread; the Redis server and other jobs share the cores "
        f"(1-minute load average {meta['load_average_1m_at_end']} at the end of the run), so throughput varies "
        f"between runs. Records/s and the synchronisation times are those of the run with the median records/s "
        f"of {settings['repeats']}; accuracies are the mean over the runs (range in brackets): with one shared "
        "buffer the workers' inserts and draws interleave differently in every run, and so does what they learn.",
        "",
        "Stream: the shipped class-incremental Fashion-MNIST slice (10 classes in order, two-level labels, 1×28×28 "
        "uint8), every STRIDE-th record; each tenth of those is held out. Record *i* goes to worker *i* mod N "
        "(what a consumer group's partitions give each worker). ER, batch size "
        f"{settings['batch_size']}, one Redis buffer of {settings['buffer_size']} samples shared by the group.",
        "",
        "Columns: *records/s* counts the group's learned records over the wall clock of the run; *sync per step* "
        "is the synchronisation's time per group step (with all-reduce, the gradient and batch-norm all-reduce "
        "of every step; with averaging, the averages of parameters and buffers spread over the steps); *other "
        "collectives* are those every group step makes whatever the synchronisation (agreeing to step or stop, "
        "sharing new label paths), per step; *online "
        "accuracy* is prequential (each record predicted before it is learned) over every learned record of the "
        "group; *final accuracy* is the final model's mean accuracy over the classes (both levels) of the held-out "
        "records; *one model* says whether all workers ended with the same parameters (SHA-256).",
        "",
        "| model | setup | records | group steps | records/s | sync per step | sync share | other collectives "
        "| online accuracy | final accuracy | one model |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {MODEL_NAMES.get(r['model'], r['model'])} (stride {r['stride']}) | {r['setup']} | {r['records']:,} "
            f"| {r['group_steps']:,} | {r['records_per_s']:,.0f} | {r['sync_ms_per_step']:.2f} ms "
            f"| {100 * r['sync_share_of_time']:.0f} % | {r['other_collectives_ms_per_step']:.2f} ms "
            f"| {_spread(r, 'online_accuracy')} | {_spread(r, 'final_accuracy')} "
            f"| {'yes' if r['same_model'] else 'no'} |"
        )
    lines += [
        "",
        "![records/s and accuracy per setup](scaleout.png)",
        "",
        "On a machine with several GPUs, the same comparison with one GPU per worker (NCCL):",
        "",
        "```bash",
        "stream-cl bench scaleout --device cuda --workers 2 4 --average-every 1 10 --repeats 3",
        "```",
        "",
    ]
    return "\n".join(lines)


def _spread(row: dict[str, Any], key: str) -> str:
    """Mean over the runs, and their range when there were several."""
    runs = row.get(f"{key}_runs") or [row[key]]
    mean = sum(runs) / len(runs)
    return f"{mean:.3f}" if len(runs) == 1 else f"{mean:.3f} ({min(runs):.3f}–{max(runs):.3f})"


def figure(rows: list[dict[str, Any]]) -> Figure:
    """Per model: records/s (bars) and final accuracy (markers, right axis) per setup."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        names = [r["setup"].replace(", ", "\n") for r in mine]
        ax.bar(range(len(mine)), [r["records_per_s"] for r in mine], color="tab:blue")
        ax.set_xticks(range(len(mine)), names, fontsize=8)
        ax.set_ylabel("records/s", color="tab:blue")
        ax.set_title(MODEL_NAMES.get(model, model))
        acc = ax.twinx()
        series = (("final_accuracy", "o", "tab:red", "final"), ("online_accuracy", "s", "tab:orange", "online"))
        for key, marker, color, label in series:
            for i, r in enumerate(mine):
                runs = r.get(f"{key}_runs") or [r[key]]
                acc.plot([i] * len(runs), runs, marker, color=color, alpha=0.6, label=label if i == 0 else None)
        acc.set_ylim(0, 1)
        acc.set_ylabel("accuracy", color="tab:red")
        acc.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
