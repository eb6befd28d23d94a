"""The HLE benchmark report: ``results.json``, ``README.md`` and per-level accuracy plots.

Runs of methods not in the current invocation are kept from an earlier ``results.json`` of the
same protocol, so methods can be added to a report one at a time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from stream_cl.bench.compute import ratio, times
from stream_cl.bench.provenance import provenance

PAPER = {
    "single": {"pl-fms": (43.7, 36.4), "er": (37.8, 31.3)},
    "dual": {"pl-fms": (49.0, 39.5), "er": (42.0, 25.5)},
    "multi": {"pl-fms": (74.5, 65.6, 56.0, 42.7, 30.8), "er": (71.5, 58.4, 36.6, 18.1, 7.47)},
}
"""Paper Table 1/2, CIFAR-100, final-task accuracy (%) per level (ResNet-34, 3 updates/sample, GPU)."""

PROTOCOL_KEYS = ("protocol", "setup", "per_class", "test_per_class", "model", "width", "buffer_size",
                  "batch_size", "online_iter", "imp_update_period", "eval_period", "onpro_rotations",
                  "onpro_replay_cap", "hparams")  # fmt: skip


def machine() -> str:
    """This machine in words: CPU model, cores, GPU."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}"


_COMPUTE_KEYS = ("seconds", "cpu_seconds", "learn_cpu_seconds", "steps")


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per method and level: [mean, sample std] over seeds of A_auc, A_last, F_last, head-only A_last; per
    method the same of the compute (wall and CPU seconds, CPU-seconds of learning, optimizer steps)."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        levels = sorted({lvl for r in mine for lvl in r["levels"]}, key=int)
        out[method] = {
            lvl: {
                key: _mean_std([r["levels"][lvl][key] for r in mine if lvl in r["levels"]])
                for key in ("A_auc", "A_last", "F_last", "A_last_head_only")
            }
            for lvl in levels
        }
        for key in _COMPUTE_KEYS:
            values = [r[key] for r in mine if key in r]  # reports written before compute was counted lack some
            if values:
                out[method][key] = _mean_std(values)
    return out


def write_report(out: Path, protocol: dict[str, Any], runs: list[dict[str, Any]]) -> Path:
    """Write the report of ``runs`` (with the runs of other (method, seed) pairs already in ``out``); returns
    its folder. Should ``out`` hold a report of another protocol by now, the runs go to a new sibling folder
    rather than replace it."""
    protocol = {k: v for k, v in protocol.items() if k in (*PROTOCOL_KEYS, "device", "stream_length", "threads")}
    conflict = protocol_conflict(out, protocol)
    if conflict:
        out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"{conflict}: this report goes to {out} instead")
    out.mkdir(parents=True, exist_ok=True)
    runs = _merged(out / "results.json", runs)
    summary = summarise(runs)
    doc = {
        "machine": machine(),
        "torch": torch.__version__,
        "provenance": provenance(),
        "protocol": protocol,
        "summary": summary,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    fig = accuracy_figure(runs, protocol["setup"])
    fig.savefig(out / "accuracy.png", dpi=80)
    plt.close(fig)
    (out / "README.md").write_text(_markdown(doc))
    return out


def protocol_conflict(out: Path, protocol: dict[str, Any]) -> str | None:
    """Why runs of ``protocol`` cannot join the report in ``out`` (another protocol's), or None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    # reports written before presets and --hparam existed ran the paper's preset with each method's defaults
    known = {"protocol": "paper", "hparams": {}} | json.loads(path.read_text())["protocol"]
    differ = [
        f"{k} {known.get(k)!r} there, {protocol.get(k)!r} here"
        for k in PROTOCOL_KEYS
        if known.get(k) != protocol.get(k)
    ]
    return f"the report in {out} has another protocol ({'; '.join(differ)})" if differ else None


def _merged(path: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not path.is_file():
        return runs
    done = {(r["method"], r["seed"]) for r in runs}  # a (method, seed) run again replaces the old run
    return [r for r in json.loads(path.read_text())["runs"] if (r["method"], r["seed"]) not in done] + runs


def _mean_std(values: list[float]) -> list[float]:
    """[mean, sample std (ddof = 1; 0 for one value)], as the accuracy report."""
    if not values:
        return [0.0, 0.0]
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def _pct(pair: list[float]) -> str:
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def _markdown(doc: dict[str, Any]) -> str:
    p, summary = doc["protocol"], doc["summary"]
    levels = sorted({lvl for s in summary.values() for lvl in s if lvl.isdigit()}, key=int)
    lines = [
        f"# HLE benchmark: {p['setup']} setup",
        "",
        f"Machine: {doc['machine']} (torch {doc['torch']}, device {p['device']}, {p.get('threads')} threads).",
        f"Protocol: CIFAR-100, stream of {p['stream_length']} samples ({p['per_class'] or 500} train images per "
        f"fine class), test {p['test_per_class'] or 100} images per fine class; {p['model']} (width "
        f"{p['width'] or 'default'}), memory {p['buffer_size']}, batch {p['batch_size']} (stream arrives "
        f"{p['batch_size'] // 2} at a time), PL-FMS online_iter {p['online_iter']}, importance re-scoring every "
        f"{p['imp_update_period']} updates, OnPro rotation views {p['onpro_rotations'] or 'default'} and replay cap "
        f"{p['onpro_replay_cap'] or 'default'}, evaluation every "
        f"{p['eval_period']} samples; seeds {_seeds(doc['runs'])} (preset `{p.get('protocol', 'paper')}`); "
        f"{_hparams(p.get('hparams', {}), doc['runs'])}.",
        "Accuracy per level (%, mean ± sample std over seeds) on test images of seen classes"
        + (", parent rule on level 0." if p["setup"] != "multi" else ", each level's own head."),
        "",
        "| method | level | A_last | A_auc | F_last | A_last (own head only) |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        for lvl in levels:
            if lvl in s:
                row = s[lvl]
                lines.append(
                    f"| {method} | {lvl} | {_pct(row['A_last'])} | {_pct(row['A_auc'])} | {_pct(row['F_last'])} "
                    f"| {_pct(row['A_last_head_only'])} |"
                )
    lines += ["", *compute_table(summary)]
    paper = PAPER.get(p["setup"], {})
    if paper:
        lines += [
            "",
            "Paper (Table 1/2: final-task accuracy per level, ResNet-34, 3 updates/sample, full data, GPU):",
            "",
        ]
        lines += [f"- {m}: " + " / ".join(f"H{i + 1} {v}" for i, v in enumerate(vals)) for m, vals in paper.items()]
        if p["setup"] == "multi":
            lines.append("- (the paper's multi-depth hierarchy has 5 levels, ours 4: not comparable level by level)")
    lines += [
        "",
        "Notes: level k is the paper's H(k+1) (level 0 = coarsest). Every method gets the stream "
        f"{p['batch_size'] // 2} samples at a time; ER takes one SGD step (lr 0.05) on them plus 10 replayed "
        "samples, OnPro one step per batch with its own replay, PL-FMS and ER-HLE (PL-FMS's loop without FMS, "
        "pseudo-labels, importance and adaptive LR; reservoir memory) `online_iter` Adam updates per sample on "
        "batches of B. The paper's figures come from the full data, ResNet-34 and a GPU: compare the ordering "
        "of methods, not the values.",
        "",
        "![per-level accuracy over the stream](accuracy.png)",
        "",
    ]
    return "\n".join(lines)


def compute_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: each method's compute per run, absolute and relative to ER's (mean over seeds)."""
    ref = summary.get("er", {})
    lines = [
        "Compute per run (mean ± sample std over seeds; ×ER: relative to `er`'s mean). Learning CPU-s is the "
        "process CPU time inside `observe` (evaluation excluded); steps are optimizer steps taken.",
        "",
        "| method | optimizer steps | ×ER steps | learning CPU-s | ×ER CPU | wall s (with evaluation) |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        steps, cpu = s.get("steps"), s.get("learn_cpu_seconds")
        step_ratio = ratio(steps and steps[0], ref.get("steps", [None])[0])
        cpu_ratio = ratio(cpu and cpu[0], ref.get("learn_cpu_seconds", [None])[0])
        lines.append(
            f"| {method} | {_num(steps)} | {times(step_ratio)} | {_num(cpu)} | {times(cpu_ratio)} "
            f"| {_num(s.get('seconds'))} |"
        )
    return lines


def _num(pair: list[float] | None) -> str:
    return "–" if pair is None else f"{pair[0]:.0f} ± {pair[1]:.0f}"


def _hparams(given: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The ``--hparam`` pairs in words, each with the methods that took it."""
    if not given:
        return "other hyper-parameters: each method's defaults"
    parts = []
    for key, value in given.items():
        takers = sorted({r["method"] for r in runs if key in r.get("hparams", {})})
        shown = (
            str(value).lower() if value is None or isinstance(value, bool) else value
        )  # as typed on the command line
        parts.append(f"`{key}={shown}` ({', '.join(takers)})")
    return "hyper-parameters set by `--hparam`: " + ", ".join(parts)


def _seeds(runs: list[dict[str, Any]]) -> str:
    return ", ".join(str(s) for s in sorted({r["seed"] for r in runs}))


def accuracy_figure(runs: list[dict[str, Any]], setup: str) -> Figure:
    """Per level, each method's accuracy over the stream: mean over seeds, shaded ± sample std (ddof = 1)."""
    levels = sorted({lvl for r in runs for lvl in r["levels"]}, key=int)
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 3.6), squeeze=False)
    for ax, lvl in zip(axes[0], levels, strict=True):
        for method in dict.fromkeys(r["method"] for r in runs):
            curves = [r["levels"][lvl]["curve"] for r in runs if r["method"] == method and lvl in r["levels"]]
            n = min(len(c) for c in curves)
            x = [c[0] for c in curves[0][-n:]]
            acc = 100 * np.array([[a for _, a in c[-n:]] for c in curves])
            mean = acc.mean(axis=0)
            (line,) = ax.plot(x, mean, marker=".", label=f"{method} ({len(curves)} seeds)")
            if len(curves) > 1:
                std = acc.std(axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"{setup}: level {lvl}")
        ax.set_xlabel("stream samples")
        ax.set_ylabel("accuracy (%, mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
