"""The GPU run's report: ``gpu.json`` (everything measured) and ``gpu.md`` (the same as tables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu.json", out / "gpu.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# GPU run (`stream-cl bench gpu`)",
        "",
        f"Device: **{m['device_name']}** ({m['device']}), torch {m['torch']}, CUDA {m['cuda']}, "
        f"Python {m['python']}; {results['wall_s']:.0f} s in all"
        + (" (tiny sizes: a smoke run, not a measurement)." if results["sizes"]["tiny"] else "."),
        "",
        *[f"- {note}" for note in results["notes"]],
        *[f"- **Part {part} failed**: {error}" for part, error in results.get("failed_parts", {}).items()],
        "",
    ]
    if "throughput" in results:
        lines += [
            "## Throughput",
            "",
            "Samples/s after the first fifth of each run's steps (autotuning, head growth, graph captures), median "
            f"over {results['sizes']['reps']} interleaved repetition(s); step latency pooled over them.",
            "",
            "| case | run | samples/s | step p50 ms | p95 ms | records |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for case in results["throughput"]:
            for label, row in case["runs"].items():
                ms = row["step_ms"]
                lines.append(
                    f"| {case['case']} | {label} | {_f(row['samples_per_s'])} | {_f(ms.get('p50'), 2)} "
                    f"| {_f(ms.get('p95'), 2)} | {row['records'][0]:,} |"
                )
            for label, error in case["errors"].items():
                lines.append(f"| {case['case']} | {label} | failed: {error.splitlines()[0][:120]} | | | |")
        ratio_rows = [
            f"| {case['case']} | {name} | {_f(r['median'], 2)} | {_f(r.get('goal'), 1)} | "
            + ("–" if "met" not in r else ("yes" if r["met"] else "no"))
            + " |"
            for case in results["throughput"]
            for name, r in case["ratios"].items()
        ]
        if ratio_rows:
            lines += ["", "| case | ratio | median | goal | met |", "|---|---|---:|---:|---|", *ratio_rows]
        lines.append("")
    if "static_step" in results:
        lines += [
            "## ER's learning step alone (static batch, no prediction or buffer around it)",
            "",
            "| case | rows | eager ms | graphed ms | graphed / eager | graphed step = eager step |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for row in results["static_step"]:
            graphed = row.get("graphed", {}).get("step_ms")
            check = row.get("graphed_matches_eager")
            same = (
                "–" if check is None else f"{'yes' if check['ok'] else 'NO'} (max Δw {check['max_abs_param_diff']:.1e})"
            )
            predicted = row.get("graphed_prediction_matches_eager")
            if predicted is not None:
                same += "; prediction " + ("same classes" if predicted["same_classes"] else "OTHER CLASSES")
                same += f" (max Δp {predicted['max_abs_confidence_diff']:.1e})"
            lines.append(
                f"| {row['case']} | {row['rows']} | {_f(row['eager']['step_ms'], 3)} | {_f(graphed, 3)} "
                f"| {_f(row.get('graphed / eager'), 1)} | {same} |"
            )
        lines.append("")
    if "onpro_flops" in results:
        lines += [
            "## OnPro's step in a later task: time and FLOP rate",
            "",
            "FLOPs per step counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, "
            "forward and backward; augmentation and elementwise work not counted). Peaks: vendor datasheet, "
            "dense, by device name (`stream_cl/bench/gpu_peaks.py`).",
            "",
            "| precision | step ms (median) | stream samples/s | GFLOP/step | TFLOP/s | card | tensor peak | "
            "of tensor peak | of fp32 peak |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for row in results["onpro_flops"]:
            lines.append(
                f"| {row['precision']} | {_f(row['step_ms']['median'], 2)} | {_f(row['stream_samples_per_s'])} "
                f"| {_f(row['gflop_per_step'], 2)} | {_f(row['achieved_tflops'], 3)} | {row['card']} "
                f"| {_f(row['tensor_peak_tflops'])} | {_pct(row['fraction_of_tensor_peak'])} "
                f"| {_pct(row['fraction_of_fp32_peak'])} |"
            )
        settings = results["onpro_flops"][0]["settings"] if results["onpro_flops"] else {}
        lines += ["", f"Settings: {settings}.", ""]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"
