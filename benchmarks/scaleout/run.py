"""Scale-out throughput: records/s of one worker and of a group of two, ER, on this machine's CPU.

Each worker reads its own half of a generated class-incremental stream (what a Kafka consumer group
gives it), learns through the real run loop and group step (stream_cl.group), one intra-op thread
per worker; the all-reduce of gradients is timed per step. Writes results.json next to this file.

    python benchmarks/scaleout/run.py            # on a GPU machine: add --device cuda (NCCL)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource, write_messages
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.group import Group
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.streams import blob_arrays, messages

CASES = {"mlp": ((1, 28, 28), 3000), "resnet18-reduced": ((3, 32, 32), 600)}


class TimedGroup(Group):
    """A group worker that times its gradient all-reduce (the synchronisation each step pays)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sync_s: list[float] = []

    def reduce(self, params, modules, loss):
        started = time.perf_counter()
        out = super().reduce(params, modules, loss)
        self.sync_s.append(time.perf_counter() - started)
        return out


def worker(rank: int, world: int, port: int, model: str, device: str, out: Path) -> None:
    torch.set_num_threads(1)
    nccl = device == "cuda"
    if nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    shape, n = CASES[model]
    x, y = blob_arrays(n_classes=10, per_class=n // 10, shape=shape, images=True)
    mine = np.arange(len(y)) % world == rank
    path = out / f"stream-{model}-{world}-{rank}.rec.gz"
    write_messages(path, messages(x[mine], y[mine]))
    group = TimedGroup(rank, world, torch.device(device))
    learner = partial(build_learner, "er", model, device=torch.device(device), seed=0, buffer_size=200)
    dist.barrier()
    started = time.perf_counter()
    with RecordedSource(path) as source:
        summary, state = run_stream(
            source,
            group.wrap(learner),
            Metrics(CollectorRegistry()),
            RunOptions(batch_size=10, progress=False),
            RunParts(lockstep=group),
        )
    dist.barrier()
    elapsed = time.perf_counter() - started
    summary = group.summarize(summary, state.learner)
    if rank == 0:
        steps = np.array(group.sync_s[1:])  # the first step also builds the learner
        result = {
            "model": model,
            "workers": world,
            "records": summary.learned,
            "seconds": round(elapsed, 2),
            "records_per_s": round(summary.learned / elapsed, 1),
            "steps": len(group.sync_s),
            "sync_ms_per_step_median": round(1000 * float(np.median(steps)), 3),
            "sync_share_of_time": round(float(steps.sum()) / elapsed, 3),
            "same_model": len({w["model_sha256"] for w in summary.workers}) == 1,
        }
        (out / f"{model}-{world}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "stream-cl-scaleout-bench"
    scratch.mkdir(exist_ok=True)
    results = []
    for model in CASES:
        for world in args.workers:
            mp.spawn(worker, args=(world, free_port(), model, args.device, scratch), nprocs=world, join=True)
            results.append(json.loads((scratch / f"{model}-{world}.json").read_text()))
            print(results[-1], flush=True)
    args.out.write_text(json.dumps({"device": args.device, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
