"""``stream-cl bench throughput``: stream-cl against the plain-PyTorch limit, on the same arithmetic.

For each case (method, model, batch sizes, stream) it measures, in interleaved repetitions:
(a) a plain in-memory PyTorch loop, the learner's ``observe`` alone, (b) a recorded file through
``run_stream`` (with and without the prefetch thread) and (c) the full service path (Kafka in,
Redis buffer, metrics served and scraped, drift detectors, checkpoints), (b) and (c) also with the same stream
batched several samples per message (wire format 2, ``b-batchedN``, ``c-batchedN``) and, when Avalanche is installed
(``pip install '.[bench]'``), (d) Avalanche's OnlineNaive with a ReplayPlugin. Then a long run keeps a
million small records going through the MLP learner and samples RSS. Writes
``throughput.json``, ``README.md`` and PNG plots under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consumers.wire import MAX_SAMPLES
from stream_cl.bench.perf import avalanche, kafka_clients, report
from stream_cl.bench.perf.data import Case, Stream, batched_messages, make_stream, messages, write_recorded
from stream_cl.bench.perf.memory import run_memory, summarise
from stream_cl.bench.perf.paths import run_learner_only, run_recorded
from stream_cl.bench.perf.plain import run_plain_er
from stream_cl.bench.perf.services import Service
from stream_cl.bench.perf.timing import StepTimes
from stream_cl.device import pick_device
from stream_cl.methods import METHODS

log = logging.getLogger("stream_cl.bench.throughput")

GOALS = {("er-resnet", "b/a"): 1.0, ("er-resnet", "c/a"): 0.95, ("er-mlp", "b/a"): 0.9, ("er-mlp", "c/a"): 0.8}

METHOD_NOTES = [
    "samples/s = 1 / median over steps of (time from one learner step's start to the next's, per record): "
    "every cycle holds the step and all the path does between steps (poll, decode, metrics, commit, ...); "
    "the median keeps bursts of other jobs on the shared cores out. The mean over the whole window "
    "(first step start to last step start) is given too; set-up (model build, broker group join) counts for no path.",
    "samples per CPU-s = records per CPU-second of the benchmark process (all its threads: prefetch, Kafka "
    "fetch+decode, checkpoint writer, exporter), from the first step's end to the last's. Unlike wall time it "
    "does not depend on what else runs on the shared cores, so CPU-time ratios are the steadier ones here. "
    "For (c) a second figure adds the broker's and redis-server's CPU over the whole run (group join included).",
    "step latency = duration of one learner step (`observe`, or the plain loop's step), pooled over repetitions.",
    "Paths run one after the other in each repetition, the order rotated between repetitions; ratios are taken "
    "within a repetition, then the median over repetitions is reported.",
    "(a) is ER written by hand: same backbone, SGD, stream/replay batch sizes, eval-mode prediction (the "
    "train/eval switch is skipped, in (a) as in stream-cl, for models without batch-norm or dropout), uniform "
    "replay from a preallocated tensor buffer, vectorised reservoir insert; one fixed-size head (stream-cl "
    "grows its heads as classes appear). (a) calls `optimizer.zero_grad()` and `optimizer.step()` as a "
    "hand-written loop does; stream-cl's ER steps plain SGD (no momentum, weight decay or hooks) with the same "
    "per-parameter `p -= lr * grad` and sets the gradients to None directly, without those calls' profiling and "
    "compile-guard wrappers (about as costly as the update itself on the MLP): the same weights bit for bit, but "
    "a saving (a) does not make, so the learner alone can come out above (a). Its own extra work per step (the "
    "finite-loss, gradient-norm and input-norm checks, label encoding, the growing heads) is still in its time. "
    "Methods without a hand-written loop (OnPro) use `learner.observe` on preloaded tensors as their (a).",
    "(b) and (c) hold out no probe samples (probe fraction 0) and never evaluate the probe, as (a) has none.",
    "(c) consumes a tansu broker (memory storage) and a redis-server the benchmark starts; one partition; a "
    "fresh consumer group per run; checkpoints every 2 s on a background thread; /metrics scraped every 1 s; "
    "the default drift detectors on.",
    kafka_clients.NOTE,
    "(c-batchedN) is (c) on the same stream produced N samples per Kafka message (wire format 2, binary): "
    "the broker, the client and the decoder work per message, the run loop and the learner per sample. "
    "(b-batchedN) is (b) on a recorded file of such messages.",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "throughput",
        help="samples/s and step latency of stream-cl against a plain PyTorch loop",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/throughput"), help="report folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes, paths (a)+(b) only: a smoke run")
    p.add_argument("--data-dir", type=Path, default=None, help="CIFAR-100 folder (default: random pixels)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default: 3, quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--cases", default=None, help="comma-separated subset of er-resnet, er-mlp, onpro")
    p.add_argument("--service", action=argparse.BooleanOptionalAction, default=None, help="run path (c)")
    p.add_argument(
        "--samples-per-message",
        default=None,
        help="samples per message of the batched (b) and (c) paths, comma-separated (default: 10,100; 0: none)",
    )
    p.add_argument("--memory-records", type=int, default=None, help="records of the long run (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--breakdown", action="store_true", help="only break path (c) down part by part (writes breakdown.md/json)"
    )
    p.set_defaults(handler=cmd_throughput)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("er-resnet", "er", "resnet18-reduced", "images", n_records=30, width=4),
            Case("er-mlp", "er", "mlp", "features", n_records=200, n_classes=10),
        ]
    out = [
        Case("er-resnet", "er", "resnet18-reduced", "images", n_records=800),
        Case("er-mlp", "er", "mlp", "features", n_records=20_000, n_classes=10),
    ]
    if "onpro" in METHODS:  # small settings: OnPro's defaults take ~5 s per step on one CPU thread
        small = {"rotations": 4, "amp": False}
        out.append(Case("onpro", "onpro", "resnet18-reduced", "images", n_records=100, width=8, hparams=small))
    return out


def cmd_throughput(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # group joins and fetches log at INFO
    device = pick_device(args.device)
    service = (not args.quick) if args.service is None else args.service
    reps = args.reps or (1 if args.quick else 3)
    chosen = cases(args.quick)
    if args.cases:
        wanted = set(args.cases.split(","))
        chosen = [c for c in chosen if c.name in wanted]
    batched = _batch_sizes(args.samples_per_message)
    memory_records = args.memory_records if args.memory_records is not None else (2000 if args.quick else 1_000_000)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.breakdown:
        return _breakdown(chosen, args.data_dir, device, reps, args.out)
    why_no_avalanche = "not run with --quick" if args.quick else avalanche.available()
    command = "stream-cl bench throughput" + (" --quick" if args.quick else "")
    result: dict[str, Any] = {
        "command": command,
        "machine": report.machine(device),
        "load_before": _load(),
        "method_notes": METHOD_NOTES,
        "cases": [],
    }
    if memory_records:  # first, so its starting RSS is not that of the cases' data
        trace = run_memory(memory_records, progress=not args.no_progress)
        result["memory"] = {
            **summarise(trace),
            "batch_size": 10,
            "trace": {"records": trace.records, "rss_mib": [r / 2**20 for r in trace.rss]},
        }
    with tempfile.TemporaryDirectory(prefix="streamcl-bench-") as tmp, ExitStack() as services:
        workdir = Path(tmp)
        endpoints = None
        if service:
            from stream_cl.bench.perf.services import kafka_broker, redis_server

            endpoints = (services.enter_context(kafka_broker(workdir)), services.enter_context(redis_server(workdir)))
        for case in chosen:
            result["cases"].append(
                _run_case(
                    case,
                    args.data_dir,
                    device,
                    reps,
                    workdir,
                    endpoints,
                    args.no_progress,
                    why_no_avalanche is None,
                    batched,
                )
            )
    result["load_after"] = _load()
    result["shared_note"] = _shared_note(result["load_before"], result["load_after"], args.threads)
    result["avalanche"] = avalanche.note() if why_no_avalanche is None else f"(d) not measured: {why_no_avalanche}."
    report.write_json(result, args.out)
    report.plot_throughput(result, args.out)
    report.plot_latency(result, args.out)
    if "memory" in result:
        report.plot_memory(result["memory"], args.out)
    report.write_markdown(result, args.out)
    print(f"report written to {args.out}/README.md")
    return 0


def _breakdown(chosen: list[Case], data_dir: Path | None, device: torch.device, reps: int, out: Path) -> int:
    from stream_cl.bench.perf.breakdown import run_breakdown, write_breakdown
    from stream_cl.bench.perf.services import kafka_broker, redis_server

    results = []
    with (
        tempfile.TemporaryDirectory(prefix="streamcl-bench-") as tmp,
        kafka_broker(Path(tmp)) as kafka,
        redis_server(Path(tmp)) as redis,
    ):
        for case in (c for c in chosen if c.method == "er"):
            stream = make_stream(case, data_dir)
            kwargs = {"kafka": kafka, "redis": redis, "device": device, "workdir": Path(tmp), "reps": reps}
            results.append(run_breakdown(case, stream, **kwargs))
    print(f"breakdown written to {write_breakdown(results, report.machine(device), out)}")
    return 0


def _run_case(
    case: Case,
    data_dir: Path | None,
    device: torch.device,
    reps: int,
    workdir: Path,
    endpoints: tuple[Service, Service] | None,
    quiet: bool,
    with_avalanche: bool = False,
    batched: tuple[int, ...] = (),
) -> dict[str, Any]:
    stream = make_stream(case, data_dir)
    recorded = {n: write_recorded(stream, workdir / f"{case.name}-x{n}.rec.gz", n) for n in (1, *batched)}
    base = "a" if case.method == "er" else "learner"
    runners = _runners(case, stream, recorded, device, with_avalanche)
    checkpoints: list[int] = []
    if endpoints is not None:
        from stream_cl.bench.perf.service_path import run_service
        from stream_cl.bench.perf.services import produce

        kafka, redis = endpoints
        topic = f"bench-{case.name}"
        produce(kafka.address, topic, messages(stream, topic))

        def service(topic: str, client: str = "kafka-python") -> StepTimes:
            before = kafka.cpu_seconds() + redis.cpu_seconds()
            times, written = run_service(
                case,
                bootstrap=kafka.address,
                topic=topic,
                redis_url=redis.address,
                n_records=len(stream),
                device=device,
                workdir=workdir,
                kafka_client=client,
            )
            times.extra_cpu_s = kafka.cpu_seconds() + redis.cpu_seconds() - before
            checkpoints.append(written)
            return times

        for name, client in kafka_clients.client_paths().items():
            runners[name] = functools.partial(service, topic, client)
        for per_message in batched:
            batched_topic = f"{topic}-x{per_message}"
            produce(kafka.address, batched_topic, batched_messages(stream, batched_topic, per_message))
            runners[f"c-batched{per_message}"] = functools.partial(service, batched_topic)
    warm = _prefix(stream, case)
    warm_files = {n: write_recorded(warm, workdir / f"warm-x{n}.rec.gz", n) for n in recorded}
    for run in _runners(case, warm, warm_files, device, with_avalanche).values():
        run()  # warm-up: imports, allocator, first-call costs
    names = list(runners)
    timings: dict[str, list[StepTimes]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            if not quiet:
                print(f"{case.name}: repetition {rep + 1}/{reps}, path {name}", flush=True)
            timings[name].append(runners[name]())
    paths = {n: _path_result(timings[n]) for n in names}
    ratios = {}
    for name in names:
        if name == base:
            continue
        key = f"{name}/{base}" if base == "a" else f"{name}/learner"
        pairs = list(zip(timings[name], timings[base], strict=True))
        per_rep = [_median_rate(t) / _median_rate(b) for t, b in pairs]
        cpu = [t.samples_per_cpu_second() / b.samples_per_cpu_second() for t, b in pairs]
        ratios[key] = {"median": statistics.median(per_rep), "reps": per_rep, "cpu_median": statistics.median(cpu)}
        ratios[key]["cpu_reps"] = cpu
        if name in kafka_clients.PATHS or name.startswith("c-batched"):
            with_services = [_cpu_rate_with_services(t) / b.samples_per_cpu_second() for t, b in pairs]
            ratios[key]["cpu_with_services_median"] = statistics.median(with_services)
        goal = GOALS.get((case.name, re.sub(r"-batched\d+", "", key.replace("b+prefetch", "b"))))
        if goal is not None and "prefetch" not in name:
            ratios[key]["goal"] = f">= {goal}"
    notes = [f"checkpoints written per (c) run: {checkpoints}"] if checkpoints else []
    if base != "a":
        notes.append("no hand-written loop for this method: ratios are against `learner.observe` alone")
    return {
        "case": asdict(case),
        "stream": stream.source,
        "reps": reps,
        "paths": paths,
        "ratios": ratios,
        "notes": notes,
    }


def _batch_sizes(text: str | None) -> tuple[int, ...]:
    """Samples per message of the batched variants of paths (b) and (c): ``"10,100"`` by default, ``"0"`` for none."""
    sizes = tuple(int(n) for n in (text or "10,100").split(",") if int(n) != 0)
    if any(not 1 < n <= MAX_SAMPLES for n in sizes):
        raise ValueError(f"--samples-per-message takes sizes in 2-{MAX_SAMPLES}, got {text!r}")
    return sizes


def _runners(
    case: Case, stream: Stream, recorded: dict[int, Path], device: torch.device, with_avalanche: bool
) -> dict[str, Any]:
    """The paths that need no services; ``recorded`` maps samples per message to the stream's file."""
    runners = {}
    if case.method == "er":
        runners["a"] = lambda: run_plain_er(case, stream, device)
        if with_avalanche:
            runners["d"] = lambda: avalanche.run_avalanche_er(case, stream, device)
    runners["learner"] = lambda: run_learner_only(case, stream, device)
    runners["b"] = lambda: run_recorded(case, recorded[1], len(stream), device, prefetch=False)
    runners["b+prefetch"] = lambda: run_recorded(case, recorded[1], len(stream), device, prefetch=True)
    for per_message, path in recorded.items():
        if per_message > 1:
            runners[f"b-batched{per_message}"] = functools.partial(
                run_recorded, case, path, len(stream), device, prefetch=False
            )
    return runners


def _prefix(stream: Stream, case: Case) -> Stream:
    n = min(len(stream), 3 * case.batch_size)
    return Stream(stream.x[:n], stream.y[:n], stream.names, stream.source)


def _median_rate(times: StepTimes) -> float:
    cycles = np.diff(times.starts) / np.asarray(times.sizes[:-1], dtype=np.float64)
    return float(1.0 / np.median(cycles)) if len(cycles) else 0.0


def _cpu_rate_with_services(times: StepTimes) -> float:
    """Records per CPU-second of this process plus the broker and Redis (theirs over the whole run)."""
    own = sum(times.sizes[1:]) / times.samples_per_cpu_second() if times.samples_per_cpu_second() else 0.0
    return sum(times.sizes[1:]) / (own + times.extra_cpu_s) if own + times.extra_cpu_s else 0.0


def _path_result(runs: list[StepTimes]) -> dict[str, Any]:
    pooled = StepTimes(durations=[d for t in runs for d in t.durations])
    rates = [_median_rate(t) for t in runs]
    out = {
        "samples_per_second": statistics.median(rates),
        "samples_per_second_reps": rates,
        "mean_samples_per_second": statistics.median(t.samples_per_second() for t in runs),
        "samples_per_cpu_second": statistics.median(t.samples_per_cpu_second() for t in runs),
        "step_latency_ms": pooled.percentiles_ms(),
        "steps": len(pooled.durations),
    }
    if any(t.extra_cpu_s for t in runs):
        out["samples_per_cpu_second_with_services"] = statistics.median(_cpu_rate_with_services(t) for t in runs)
    return out


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _shared_note(before: list[float] | None, after: list[float] | None, threads: int) -> str:
    if before is None or after is None:
        return "load average unknown"
    if max(before[0], after[0]) > threads + 1:
        return (
            "the machine was shared with other jobs during this run (1-minute load above what the benchmark "
            "itself puts on it): absolute numbers are pessimistic, and only ratios within a repetition are fair"
        )
    return "the machine looked otherwise idle during this run"
