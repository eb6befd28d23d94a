"""``stream-cl bench scaleout``: one worker against groups of workers, by synchronisation, same stream.

For each model, the shipped class-incremental Fashion-MNIST stream (every ``--stride``-th record;
each tenth of those held out) is split between the workers as a consumer group splits a topic's
partitions (record *i* to worker *i* mod N), and every configuration learns it once with ER and one
Redis buffer shared by the group: one worker (the reference: the plain loop, no group), then N workers with the per-step
gradient all-reduce and with parameter averaging every K group steps. Each worker runs the real run
loop and group step (:mod:`stream_cl.group`) in its own process with one intra-op thread; the group
is formed by ``torch.distributed`` (gloo on CPU, NCCL with ``--device cuda``).

Measured: records learned per second (wall clock of the slowest worker), the synchronisation's time
per group step (the gradient all-reduce, or the averages amortised over the steps), online
(prequential) accuracy over the group's records, and the final model's accuracy on the held-out records.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consumers.open import open_source
from consumers.record import Message, Position
from consumers.recorded import write_messages
from consumers.wire import encode_binary
from stream_cl.group import Group, process_group

MODELS = ("mlp", "resnet18-reduced")


@dataclass(frozen=True)
class Setup:
    """One configuration: the number of workers and how they keep one model."""

    workers: int
    sync: str = "allreduce"
    average_every: int = 1

    @property
    def name(self) -> str:
        if self.workers == 1:
            return "1 worker"
        how = "all-reduce" if self.sync == "allreduce" else f"average every {self.average_every}"
        return f"{self.workers} workers, {how}"


class TimedGroup(Group):
    """A group worker that times its synchronisation (the gradient all-reduces, or the averages) and
    the collectives every step makes whatever the synchronisation (agreeing to step, sharing labels)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync_s: list[float] = []
        self.other_s: list[float] = []

    def agree(self, polled: int, ended: bool, stopping: bool) -> tuple[bool, bool]:
        started = time.perf_counter()
        out = super().agree(polled, ended, stopping)
        self.other_s.append(time.perf_counter() - started)
        return out

    def gather_json(self, value: Any) -> list[Any]:
        started = time.perf_counter()
        out = super().gather_json(value)
        self.other_s.append(time.perf_counter() - started)
        return out

    def reduce(self, params: Any, modules: Any, loss: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = super().reduce(params, modules, loss)
        self.sync_s.append(time.perf_counter() - started)
        return out

    def average(self, learner: Any) -> None:
        started = time.perf_counter()
        super().average(learner)
        self.sync_s.append(time.perf_counter() - started)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scaleout", help="records/s, sync cost and accuracy of 1 worker and groups of workers")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="group sizes (1 worker always runs)")
    p.add_argument("--average-every", type=int, nargs="+", default=[1, 10], help="K of the averaging runs")
    p.add_argument("--stride", type=int, nargs="+", default=[1, 5], help="per model: stream every STRIDE-th record")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--buffer-size", type=int, default=500, help="the group's one Redis buffer")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the median is reported)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per worker, NCCL)")
    p.add_argument("--redis", default=None, help="redis:// URL to use (default: start a redis-server)")
    p.add_argument("--out", default="benchmarks/scaleout", help="report folder")
    p.set_defaults(handler=cmd_scaleout)


def setups(workers: list[int], average_every: list[int]) -> list[Setup]:
    out = [Setup(1)]
    for n in workers:
        if n > 1:
            out += [Setup(n, "allreduce")] + [Setup(n, "average", k) for k in average_every]
    return out


def cmd_scaleout(args: argparse.Namespace) -> int:
    import contextlib

    from stream_cl.bench.buffer import redis_server
    from stream_cl.bench.scaleout_report import write_report

    if len(args.stride) != len(args.models):
        args.stride = [args.stride[0]] * len(args.models) if len(args.stride) == 1 else args.stride
    if len(args.stride) != len(args.models):
        raise SystemExit("stream-cl bench scaleout: give one --stride per model")
    rows: list[dict[str, Any]] = []
    configs = setups(args.workers, args.average_every)
    total = len(args.models) * len(configs) * args.repeats
    done = 0
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="streamcl-scaleout-") as tmp:
        url = args.redis or stack.enter_context(redis_server())
        for model, stride in zip(args.models, args.stride, strict=True):
            stream, held_out = _stream(stride)
            for setup in configs:
                runs = []
                for repeat in range(args.repeats):
                    done += 1
                    print(f"[{done}/{total}] {model}, {setup.name} (run {repeat + 1})", flush=True)
                    runs.append(_measure(model, setup, stream, held_out, url, args, Path(tmp) / f"{done}"))
                rows.append(_median(runs) | {"repeats": args.repeats, "stride": stride})
                print("   " + _line(rows[-1]), flush=True)
    write_report(Path(args.out), vars(args), rows)
    print(f"report written to {args.out}")
    return 0


def _stream(stride: int) -> tuple[list[tuple[str, np.ndarray, tuple[str, ...]]], list[tuple[np.ndarray, tuple]]]:
    """The shipped stream, every ``stride``-th record: (streamed records, held-out records)."""
    from stream_cl.assemble import default_stream

    records = []
    with open_source(str(default_stream())) as source:
        while not source.exhausted:
            records += [(r.id, r.x.copy(), r.label) for r in source.poll(0.0, 1000).records]
    kept = records[::stride]
    held = [(x, label) for i, (_, x, label) in enumerate(kept) if i % 10 == 9]
    return [r for i, r in enumerate(kept) if i % 10 != 9], held


def _measure(
    model: str,
    setup: Setup,
    stream: list,
    held_out: list,
    url: str,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from stream_cl.bench.perf.services import free_port

    workdir.mkdir(parents=True)
    for rank in range(setup.workers):
        mine = stream[rank :: setup.workers]
        write_messages(workdir / f"part-{rank}.rec.gz", (_message(i, *r) for i, r in enumerate(mine)))
    held = {"x": torch.from_numpy(np.stack([x for x, _ in held_out])), "y": [list(y) for _, y in held_out]}
    torch.save(held, workdir / "held")
    buffer = f"{url}?name=scaleout-{workdir.name}-{time.monotonic_ns()}"
    options = {"model": model, "batch_size": args.batch_size, "buffer": buffer, "buffer_size": args.buffer_size}
    mp.spawn(
        _worker,
        args=(setup, free_port(), args.device, options, workdir),
        nprocs=setup.workers,
        join=True,
    )
    return {"model": model, "setup": setup.name, **vars(setup), **json.loads((workdir / "result.json").read_text())}


def _message(i: int, sample_id: str, x: np.ndarray, label: tuple[str, ...]) -> Message:
    value, headers = encode_binary(sample_id, x, list(label))
    return Message(Position("stream", 0, i), float(i), None, value, tuple(headers))


def _worker(rank: int, setup: Setup, port: int, device: str, options: dict[str, Any], workdir: Path) -> None:
    """One worker: join the group, learn its part of the stream, and (rank 0) write the group's result."""
    import torch.distributed as dist
    from prometheus_client import CollectorRegistry

    from consumers.recorded import RecordedSource
    from monitoring.metrics import Metrics
    from monitoring.probe import ProbeSet
    from stream_cl.build import build_learner
    from stream_cl.publishing import evaluate
    from stream_cl.run import RunOptions, RunParts, run_stream

    torch.set_num_threads(1)
    nccl = device == "cuda"
    if nccl:
        torch.cuda.set_device(rank)
    backend = "nccl" if nccl else "gloo"
    with process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=setup.workers):
        where = torch.device(f"cuda:{rank}" if nccl else device)
        # one worker is the plain service loop (no group, no collectives): what a single `serve` does
        group = None
        if setup.workers > 1:
            group = TimedGroup(rank, setup.workers, where, sync=setup.sync, average_every=setup.average_every)
        make = partial(
            build_learner,
            "er",
            options["model"],
            device=where,
            seed=0,
            buffer_spec=options["buffer"],
            buffer_size=options["buffer_size"],
        )
        # online accuracy over every record (not a window); no periodic probe (the held-out set is scored at the end)
        run_options = RunOptions(
            batch_size=options["batch_size"], progress=False, probe_every=10**12, online_window=10**9
        )
        dist.barrier()
        started = time.perf_counter()
        with RecordedSource(workdir / f"part-{rank}.rec.gz") as source:
            factory = make if group is None else group.wrap(make)
            metrics = Metrics(CollectorRegistry())
            summary, state = run_stream(source, factory, metrics, run_options, RunParts(lockstep=group))
        online = [[summary.online_accuracy, summary.learned]]
        steps, sync_s, other_s, models = -(-summary.consumed // options["batch_size"]), [0.0], [0.0], 1
        if group is not None:
            online = group.gather_json(online[0])
            summary = group.summarize(summary, state.learner)  # ends with one model (an average, with --sync average)
            steps, sync_s, other_s = group.steps, group.sync_s, group.other_s
            models = len({w["model_sha256"] for w in summary.workers})
        dist.barrier()
        elapsed = time.perf_counter() - started
        if rank == 0:
            held = torch.load(workdir / "held", weights_only=True)
            probe = ProbeSet(fraction=1.0, per_class=10**6)
            for x, y in zip(held["x"], held["y"], strict=True):
                probe.add(x.numpy(), tuple(y))
            final = evaluate(probe, state.learner)
            result = {
                "records": summary.learned,
                "seconds": round(elapsed, 2),
                "records_per_s": round(summary.learned / elapsed, 1),
                "group_steps": steps,
                "sync_ms_per_step": round(1000 * sum(sync_s) / max(steps, 1), 3),
                "sync_share_of_time": round(sum(sync_s) / elapsed, 3),
                "other_collectives_ms_per_step": round(1000 * sum(other_s) / max(steps, 1), 3),
                "online_accuracy": round(sum(a * n for a, n in online) / max(sum(n for _, n in online), 1), 4),
                "final_accuracy": round(final.accuracy, 4),
                "held_out": len(held["y"]),
                "same_model": models == 1,
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
            (workdir / "result.json").write_text(json.dumps(result))


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, with every run's throughput and accuracies beside it: with a
    shared buffer the workers' inserts and draws interleave differently from run to run, and so does accuracy."""
    row = dict(sorted(runs, key=lambda r: r["records_per_s"])[len(runs) // 2])
    for key in ("records_per_s", "online_accuracy", "final_accuracy"):
        row[f"{key}_runs"] = [r[key] for r in runs]
    return row


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['records_per_s']:.0f} records/s, sync {row['sync_ms_per_step']:.2f} ms/step (other collectives "
        f"{row['other_collectives_ms_per_step']:.2f}), online accuracy "
        f"{row['online_accuracy']:.3f}, final accuracy {row['final_accuracy']:.3f}, one model: {row['same_model']}"
    )
