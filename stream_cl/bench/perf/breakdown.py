"""Where path (c) spends: the service path with its parts switched on one at a time, CPU time per record."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stream_cl.bench.perf.data import Case, Stream, messages, write_recorded
from stream_cl.bench.perf.paths import run_recorded
from stream_cl.bench.perf.plain import run_plain_er
from stream_cl.bench.perf.service_path import run_service
from stream_cl.bench.perf.services import Service, produce
from stream_cl.bench.perf.timing import StepTimes

STEPS = (
    "(a) plain loop",
    "(b) recorded file",
    "(c) Kafka, in-process buffer, no drift, final checkpoint only",
    "+ Redis buffer",
    "+ checkpoints every 2 s",
    "+ drift detectors = full (c)",
)


def run_breakdown(
    case: Case, stream: Stream, *, kafka: Service, redis: Service, device: torch.device, workdir: Path, reps: int
) -> dict[str, Any]:
    """Samples per CPU-second of each step of :data:`STEPS`, in interleaved repetitions."""
    recorded = write_recorded(stream, workdir / f"breakdown-{case.name}.rec.gz")
    topic = f"breakdown-{case.name}"
    produce(kafka.address, topic, messages(stream, topic))

    def service(**kwargs: Any) -> Callable[[], StepTimes]:
        common = {"bootstrap": kafka.address, "topic": topic, "n_records": len(stream), "device": device}
        return lambda: run_service(case, workdir=workdir, **common, **kwargs)[0]

    runners = dict(
        zip(
            STEPS,
            (
                lambda: run_plain_er(case, stream, device),
                lambda: run_recorded(case, recorded, len(stream), device, prefetch=False),
                service(redis_url="memory", drift=False, checkpoint_every_s=None),
                service(redis_url=redis.address, drift=False, checkpoint_every_s=None),
                service(redis_url=redis.address, drift=False),
                service(redis_url=redis.address),
            ),
            strict=True,
        )
    )
    rates: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(reps):
        for step, run in runners.items():
            rates[step].append(run().samples_per_cpu_second())
    return {"case": case.name, "reps": reps, "samples_per_cpu_second": rates}


def write_breakdown(results: list[dict[str, Any]], machine: dict[str, Any], out: Path) -> Path:
    """``breakdown.json`` and ``breakdown.md`` under ``out``."""
    (out / "breakdown.json").write_text(json.dumps({"machine": machine, "cases": results}, indent=1) + "\n")
    lines = [
        "# Where path (c) spends (`stream-cl bench throughput --breakdown`)",
        "",
        f"Samples per CPU-second of the benchmark process, median of the repetitions; machine: "
        f"{machine['cpu'].get('Model name', '?')}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['torch_threads']} thread(s), device {machine['device']}, load average {machine['load_average']}.",
        "",
    ]
    for result in results:
        rates = {k: statistics.median(v) for k, v in result["samples_per_cpu_second"].items()}
        base = rates[STEPS[0]]
        lines += [f"## {result['case']} ({result['reps']} repetitions)", "", "| step | samples per CPU-s | / (a) |"]
        lines += ["|---|---:|---:|"]
        lines += [f"| {step} | {rate:,.0f} | {rate / base:.3f} |" for step, rate in rates.items()]
        lines.append("")
    path = out / "breakdown.md"
    path.write_text("\n".join(lines))
    return path
