"""``stream-cl bench gpu``: the GPU run in one command -- every method, AMP, CUDA graphs, OnPro's FLOP rate.

Three parts, sized to finish well within 8 minutes on one data-centre GPU:

1. **Throughput cases** (interleaved repetitions): ER with the reduced ResNet-18 and ER with an MLP
   on feature vectors -- (a) the plain PyTorch loop, ``learner.observe`` eager and with
   ``cuda_graphs=True``, and (b) a recorded file through ``run_stream``, eager and graphed; OnPro in
   float32 and with AMP in float16 and bfloat16; PL-FMS (with AMP too when the method has an ``amp``
   switch).
2. **The learning step alone**: ER's static step on one fixed batch, eager against replayed as a
   CUDA graph (what the graph saves, without prediction, label encoding and buffer draws around it).
3. **OnPro's step** at the paper's settings in a later task (APF and replay on): step time, FLOPs per
   step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward
   and backward) and the achieved rate against the card's peak (:mod:`stream_cl.bench.gpu_peaks`).

``--device cpu --tiny`` runs every part at toy sizes (the test). Writes ``gpu.json`` and ``gpu.md``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from stream_cl.bench.gpu_peaks import fraction_of_peak
from stream_cl.bench.gpu_report import write_report
from stream_cl.bench.perf.data import Case, Stream, make_stream, write_recorded
from stream_cl.bench.perf.paths import build, run_recorded
from stream_cl.bench.perf.plain import run_plain_er
from stream_cl.bench.perf.timing import StepTimes
from stream_cl.bench.provenance import provenance
from stream_cl.device import pick_device
from stream_cl.inputs import to_model_input
from stream_cl.learner import Batch, Learner
from stream_cl.methods import hyper_parameters
from stream_cl.methods.er_graph import StaticPrediction, StaticReplayStep

log = logging.getLogger("stream_cl.bench.gpu")

GOALS = {
    ("er-resnet", "learner graphed / plain (a)"): 5.0,
    ("er-mlp", "learner graphed / plain (a)"): 10.0,
    ("er-resnet", "recorded graphed (b) / learner graphed"): 0.9,
    ("er-mlp", "recorded graphed (b) / learner graphed"): 0.9,
}
"""(case, ratio) → the value it should reach on a GPU."""

PARTS = ("throughput", "step", "flops")

CPU_NOTE = (
    "AMP and CUDA graphs take effect on CUDA only: on CPU the AMP rows run in float32 and the graphed rows run "
    "the same static step eagerly."
)


@dataclass(frozen=True)
class Sizes:
    """How much each part runs; ``GPU`` fits the 8-minute budget, ``TINY`` is the CPU smoke run."""

    er_resnet_records: int
    er_mlp_records: int
    onpro_records: int
    plfms_records: int
    reps: int
    step_iterations: int  # part 2: static steps timed per mode
    flop_warmup: int  # part 3: OnPro's task-0 steps (then half as many in task 1 before timing)
    flop_timed: int
    flop_counted: int
    max_run_s: float  # a learner run stops after this long (whatever its records)
    tiny: bool


GPU_SIZES = Sizes(3000, 20000, 600, 300, 2, 300, 40, 20, 3, 60.0, tiny=False)
TINY_SIZES = Sizes(30, 100, 20, 20, 1, 3, 6, 2, 1, 30.0, tiny=True)  # 6: OnPro's task grace is 5 steps


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gpu",
        help="the GPU run: every method, AMP, CUDA graphs, OnPro's FLOP rate",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/gpu/results"), help="report folder")
    p.add_argument("--device", default="cuda", help="cuda (default), cpu, auto")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run that fits a CPU in seconds")
    p.add_argument("--data-dir", type=Path, default=None, help="CIFAR-100 folder (default: random pixels)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions of part 1")
    p.add_argument("--parts", default="throughput,step,flops", help="comma-separated subset of the three parts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; tiny: 1)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = pick_device(args.device)
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    if args.reps is not None:
        sizes = replace(sizes, reps=args.reps)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        print(
            f"stream-cl bench gpu: error: --parts takes a comma-separated subset of {', '.join(PARTS)}", file=sys.stderr
        )
        return 2
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)  # on shared CPU cores more threads than cores cost far more than they give
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes per step: let cuDNN pick once
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "gpu",
        "machine": machine(device),
        "sizes": asdict(sizes),
        "provenance": provenance(),
        "notes": [] if device.type == "cuda" else [CPU_NOTE],
        "wall_s": 0.0,
    }
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        ("throughput", "throughput", lambda: throughput(cases(sizes), sizes, device, args.data_dir)),
        ("step", "static_step", lambda: [static_step(c, sizes, device) for c in cases(sizes) if c.method == "er"]),
        ("flops", "onpro_flops", lambda: onpro_flops(sizes, device)),
    ]
    for part, key, measure in steps:
        if part in parts:
            try:
                results[key] = measure()
            except Exception as error:  # one part failing must not cost the others' numbers
                log.exception("part %s failed", part)
                results.setdefault("failed_parts", {})[part] = f"{type(error).__name__}: {error}"
            results["wall_s"] = time.perf_counter() - started
            write_report(results, args.out)  # after each part: a run cut short keeps what it measured
    print(f"wrote gpu.json and gpu.md under {args.out} in {results['wall_s']:.0f} s")
    return 1 if "failed_parts" in results else 0


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def cases(sizes: Sizes) -> list[Case]:
    """The throughput cases; tiny sizes shrink the networks too."""
    small = {"width": 4} if sizes.tiny else {}
    onpro = {"rotations": 2, "replay_cap": 8} if sizes.tiny else {"rotations": 16, "replay_cap": 64}
    return [
        Case("er-resnet", "er", "resnet18-reduced", "images", sizes.er_resnet_records, **small),
        Case("er-mlp", "er", "mlp", "features", sizes.er_mlp_records),
        Case(
            "onpro",
            "onpro",
            "resnet18-reduced" if sizes.tiny else "resnet18",
            "images",
            sizes.onpro_records,
            width=4 if sizes.tiny else 64,
            hparams=onpro,
        ),
        Case(
            "pl-fms",
            "pl-fms",
            "resnet18-reduced",
            "images",
            sizes.plfms_records,
            **small,
            hparams={"total_stream_length": sizes.plfms_records, **({"online_iter": 1} if sizes.tiny else {})},
        ),
    ]


def _accepts(method: str, name: str) -> bool:
    return name in hyper_parameters(method)


def variants(case: Case) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, path, extra hparams)`` of each run of a case; path is plain, learner or recorded."""
    if case.method == "er":
        out = [("plain (a)", "plain", {}), ("learner eager", "learner", {}), ("recorded eager (b)", "recorded", {})]
        if _accepts("er", "cuda_graphs"):
            out += [
                ("learner graphed", "learner", {"cuda_graphs": True}),
                ("recorded graphed (b)", "recorded", {"cuda_graphs": True}),
            ]
        return out
    out = (
        [("learner float32", "learner", {"amp": False})]
        if _accepts(case.method, "amp")
        else [("learner", "learner", {})]
    )
    if _accepts(case.method, "amp"):
        if _accepts(case.method, "amp_dtype"):
            out += [(f"learner AMP {d}", "learner", {"amp": True, "amp_dtype": d}) for d in ("float16", "bfloat16")]
        else:
            out.append(("learner AMP", "learner", {"amp": True}))
    return out


def throughput(all_cases: list[Case], sizes: Sizes, device: torch.device, data_dir: Path | None) -> list[dict]:
    """Part 1: every variant of every case, repetitions interleaved, summarised per variant."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in all_cases:
            stream = make_stream(case, data_dir)
            if sizes.tiny and case.kind == "images":
                stream = replace(stream, x=np.ascontiguousarray(stream.x[:, :8, :8]))  # toy images for the smoke run
            recorded = write_recorded(stream, Path(tmp) / f"{case.name}.bin") if case.method == "er" else None
            runs: dict[str, list[StepTimes]] = {label: [] for label, _, _ in variants(case)}
            errors: dict[str, str] = {}
            for rep in range(sizes.reps):
                order = variants(case)
                order = order[rep % len(order) :] + order[: rep % len(order)]
                for label, path, extra in order:
                    if label in errors:
                        continue
                    log.info("%s: %s, repetition %d", case.name, label, rep + 1)
                    variant = replace(case, hparams={**case.hparams, **extra})
                    try:
                        runs[label].append(_one_run(variant, path, stream, recorded, device, sizes))
                    except Exception as error:  # a failing variant is reported, the others still run
                        log.exception("%s: %s failed", case.name, label)
                        errors[label] = f"{type(error).__name__}: {error}"
            out.append(_summarise(case, stream, runs, errors))
    return out


def _one_run(
    case: Case, path: str, stream: Stream, recorded: Path | None, device: torch.device, sizes: Sizes
) -> StepTimes:
    if path == "plain":
        return run_plain_er(case, stream, device)
    if path == "recorded":
        return run_recorded(case, recorded, len(stream), device, prefetch=False)
    return _learner_run(case, stream, device, sizes.max_run_s)


def _learner_run(case: Case, stream: Stream, device: torch.device, max_s: float) -> StepTimes:
    """``learner.observe`` on preloaded tensors, stopping after ``max_s`` seconds."""
    learner = build(case, stream.x.shape[1:], stream.x.dtype, device, 0)
    xs = torch.from_numpy(stream.x)
    labels = [(stream.names[k],) for k in stream.y.tolist()]
    times, began = StepTimes(), time.perf_counter()
    for begin in range(0, len(stream), case.batch_size):
        start = time.perf_counter()
        learner.observe(Batch(xs[begin : begin + case.batch_size], labels[begin : begin + case.batch_size]))
        times.add(start, time.perf_counter(), len(labels[begin : begin + case.batch_size]))
        if start - began > max_s:
            break
    return times


def steady_rate(times: StepTimes) -> float:
    """Records per second after the first fifth of the steps (cuDNN autotuning, allocator growth, heads growing
    as classes arrive, graph captures), from the first counted step's start to the last step's start."""
    skip = max(1, len(times.starts) // 5)
    if len(times.starts) - skip < 2:
        return times.samples_per_second()
    return sum(times.sizes[skip:-1]) / (times.starts[-1] - times.starts[skip])


def _summarise(case: Case, stream: Stream, runs: dict[str, list[StepTimes]], errors: dict[str, str]) -> dict:
    rows = {}
    for label, reps in runs.items():
        if not reps:
            continue
        pooled = StepTimes(durations=[d for t in reps for d in t.durations])
        rows[label] = {
            "samples_per_s": statistics.median(steady_rate(t) for t in reps),
            "records": [sum(t.sizes) for t in reps],
            "step_ms": pooled.percentiles_ms(),
        }
    ratios = {}
    if case.method == "er":
        pairs = [
            ("learner eager / plain (a)", "learner eager", "plain (a)"),
            ("learner graphed / plain (a)", "learner graphed", "plain (a)"),
            ("learner graphed / learner eager", "learner graphed", "learner eager"),
            ("recorded eager (b) / plain (a)", "recorded eager (b)", "plain (a)"),
            ("recorded graphed (b) / learner graphed", "recorded graphed (b)", "learner graphed"),
        ]
        for name, top, bottom in pairs:
            if top in runs and bottom in runs and runs[top] and len(runs[top]) == len(runs[bottom]):
                per_rep = [steady_rate(t) / steady_rate(b) for t, b in zip(runs[top], runs[bottom], strict=True)]
                ratios[name] = {"median": statistics.median(per_rep), "per_rep": per_rep}
                goal = GOALS.get((case.name, name))
                if goal is not None:
                    ratios[name] |= {"goal": goal, "met": statistics.median(per_rep) >= goal}
    case_info = {k: v for k, v in asdict(case).items() if k not in ("hparams",)}
    return {
        "case": case.name,
        "settings": case_info | {"hparams": case.hparams},
        "stream": stream.source,
        "runs": rows,
        "ratios": ratios,
        "errors": errors,
    }


def static_step(case: Case, sizes: Sizes, device: torch.device) -> dict:
    """Part 2: ER's static learning step on one fixed batch (stream + replay rows), eager vs graphed."""
    stream = make_stream(replace(case, n_records=case.batch_size + case.replay_batch_size), None)
    if sizes.tiny and case.kind == "images":
        stream = replace(stream, x=np.ascontiguousarray(stream.x[:, :8, :8]))
    learner = build(case, stream.x.shape[1:], stream.x.dtype, device, 0)
    labels = [(stream.names[k],) for k in stream.y.tolist()]
    learner.observe(Batch(torch.from_numpy(stream.x), labels))  # grows the heads to the batch's classes
    inputs = to_model_input(torch.from_numpy(stream.x).to(device))
    level_np, y_np, _ = learner.labels.encode(labels)
    targets, levels = torch.from_numpy(y_np).to(device), torch.from_numpy(level_np).to(device)
    out: dict[str, Any] = {"case": case.name, "rows": len(inputs), "graphs_available": device.type == "cuda"}
    model = learner.model
    start_state = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    after: dict[str, list[torch.Tensor]] = {}
    for mode in ("eager", "graphed") if device.type == "cuda" else ("eager",):
        with torch.no_grad():  # both modes learn the same first step from the same weights
            for tensor, saved in zip((*model.parameters(), *model.buffers()), start_state, strict=True):
                tensor.copy_(saved)
        graphs = mode == "graphed"
        step = StaticReplayStep(
            model, learner.optimizer, learner.guard, case.replay_batch_size, graphs=graphs, settle=0
        )
        model.train()
        loss = step(inputs, targets, levels, case.replay_batch_size)  # allocation (and capture), one step learned
        after[mode] = [p.detach().clone() for p in model.parameters()]
        _sync(device)
        start = time.perf_counter()
        for _ in range(sizes.step_iterations):
            step(inputs, targets, levels, case.replay_batch_size)
        _sync(device)
        seconds = (time.perf_counter() - start) / sizes.step_iterations
        out[mode] = {"first_loss": loss, "step_ms": seconds * 1e3, "stream_samples_per_s": case.batch_size / seconds}
    if "graphed" in after:  # the check that the captured step learns what the eager one does
        diff = max(float((a - b).abs().max()) for a, b in zip(after["eager"], after["graphed"], strict=True))
        out["graphed_matches_eager"] = {"max_abs_param_diff": diff, "ok": diff <= 1e-4}
        stream_x = inputs[: case.batch_size]
        eager = model.predict_prepared(stream_x)
        graphed = StaticPrediction(model, graphs=True, settle=0).predict_prepared(stream_x)
        confidence_diff = float((eager.confidence - graphed.confidence).abs().max())
        out["graphed_prediction_matches_eager"] = {
            "same_classes": bool(torch.equal(eager.classes, graphed.classes)),
            "max_abs_confidence_diff": confidence_diff,
        }
    if "graphed" in out:
        out["graphed / eager"] = out["eager"]["step_ms"] / out["graphed"]["step_ms"]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def task_stream(task0_steps: int, task1_steps: int, classes_per_task: int, batch: int, side: int) -> list[Batch]:
    """``side``² images in batches whose classes come in two tasks of ``classes_per_task`` classes each."""
    rng = np.random.default_rng(0)
    out = []
    for step in range(task0_steps + task1_steps):
        task = 0 if step < task0_steps else 1
        classes = rng.integers(0, classes_per_task, size=batch) + task * classes_per_task
        x = torch.from_numpy(rng.integers(0, 256, size=(batch, side, side, 3), dtype=np.uint8))
        out.append(Batch(x, [(f"c{c}",) for c in classes]))
    return out


def onpro_flops(sizes: Sizes, device: torch.device) -> list[dict]:
    """Part 3: OnPro's step time and FLOP rate in a later task, per precision the device runs."""
    case = next(c for c in cases(sizes) if c.method == "onpro")
    precisions = ["float32", "float16", "bfloat16"] if device.type == "cuda" else ["float32"]
    task1_warmup = sizes.flop_warmup // 2  # APF and the replay batch settle in the new task
    task1 = task1_warmup + sizes.flop_timed + sizes.flop_counted
    side = 8 if sizes.tiny else 32
    batches = task_stream(sizes.flop_warmup, task1, 2 if sizes.tiny else 10, 10, side)
    out = []
    for precision in precisions:
        amp = {"amp": precision != "float32", "amp_dtype": "float16" if precision == "float32" else precision}
        learner = build(replace(case, hparams={**case.hparams, **amp}), (side, side, 3), np.dtype(np.uint8), device, 0)
        log.info("onpro flops: %s", precision)
        feed = iter(batches)
        for _ in range(sizes.flop_warmup + task1_warmup):  # through task 0 into task 1
            learner.observe(next(feed))
        durations = [_timed(learner, next(feed), device) for _ in range(sizes.flop_timed)]
        flops = []
        for _ in range(sizes.flop_counted):
            with FlopCounterMode(display=False) as counter:
                learner.observe(next(feed))
            flops.append(counter.get_total_flops())
        step_s = statistics.median(durations)
        achieved = statistics.mean(flops) / step_s / 1e12
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        out.append(
            {
                "precision": precision,
                "settings": {"model": case.model, "width": case.width, **case.hparams},
                "task": learner.task,
                "step_ms": {"median": step_s * 1e3, "min": min(durations) * 1e3, "max": max(durations) * 1e3},
                "stream_samples_per_s": 10 / step_s,
                "gflop_per_step": statistics.mean(flops) / 1e9,
                "achieved_tflops": achieved,
                **fraction_of_peak(achieved, name, precision),
            }
        )
    return out


def _timed(learner: Learner, batch: Batch, device: torch.device) -> float:
    start = time.perf_counter()
    learner.observe(batch)
    _sync(device)
    return time.perf_counter() - start
