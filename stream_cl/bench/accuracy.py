"""``stream-cl bench accuracy``: the OnPro paper's protocol through the Learner contract.

CIFAR-100 classes in natural order are split into ``tasks`` equal tasks; each task's training
images are shuffled and fed once in batches of 10 (``observe`` on raw uint8 tensors); after each
task the learner is evaluated on the test images of every task seen so far, giving an accuracy
matrix per run, then final average accuracy and forgetting (spec §3), mean ± sample std over runs, and
each run's compute (optimizer steps, CPU-seconds of learning) next to it.

A method may be benchmarked under several settings: ``--method er er:x10 --hparam er:x10.iterations=10``
reports ER and ER with ten steps per batch (the compute of a costlier method) as two rows.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from consumers.datasets import LabelledArrays, load_cifar100
from stream_cl.assemble import check_hparams
from stream_cl.bench import cl_metrics
from stream_cl.bench.accuracy_report import machine, write_report
from stream_cl.bench.compute import Compute
from stream_cl.build import build_learner
from stream_cl.config import parse_hparam
from stream_cl.device import pick_device
from stream_cl.errors import ConfigError
from stream_cl.learner import Batch, Learner
from stream_cl.methods import METHODS


@dataclass(frozen=True)
class Protocol:
    """One benchmark setting; ``hparams`` maps method → constructor keywords."""

    dataset: str = "cifar100"
    classes: int = 100
    tasks: int = 10
    memory: int = 1000
    model: str = "resnet18"
    width: int | None = None
    train_per_class: int | None = None
    batch_size: int = 10
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accuracy", help="OnPro paper protocol: accuracy matrix, final accuracy, forgetting")
    p.add_argument(
        "--method",
        nargs="+",
        default=["onpro"],
        type=method_label,
        metavar="METHOD[:TAG]",
        help=f"one or more of {', '.join(sorted(METHODS))}; a :TAG names a variant with its own --hparam",
    )
    p.add_argument("--dataset", default="cifar100", choices=["cifar100"])
    p.add_argument("--data-dir", type=Path, required=True, help="folder with the CIFAR-100 npz files")
    p.add_argument("--memory", type=int, default=1000, help="replay buffer size M (default: 1000)")
    p.add_argument("--runs", type=int, default=3, help="runs (seeds seed..seed+runs-1) per method (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=100, help="use the first N classes (default: 100)")
    p.add_argument("--tasks", type=int, default=10, help="number of equal tasks (default: 10)")
    p.add_argument("--train-per-class", type=int, default=None, help="first N training images per class (default: all)")
    p.add_argument("--model", default="resnet18", help="backbone (default: resnet18, the paper's)")
    p.add_argument("--width", type=int, default=None, help="ResNet nf (default: the model's; paper: 64)")
    p.add_argument("--rotations", type=int, default=None, help="OnPro rotation views (paper: 16)")
    p.add_argument("--replay-cap", type=int, default=None, help="OnPro replay batch cap (paper: 64)")
    p.add_argument(
        "--hparam",
        action="append",
        type=parse_hparam,
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="method hyper-parameter, repeatable; a METHOD. prefix limits it to one method",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/accuracy"))
    p.add_argument("--name", default=None, help="report file stem (default: from the settings)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_accuracy)


def method_label(text: str) -> str:
    """A ``--method`` entry: a method name, optionally ``:TAG`` (no dots, which separate ``--hparam`` keys)."""
    if method_of(text) not in METHODS or "." in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD[:TAG] with METHOD one of {', '.join(METHODS)}")
    return text


def method_of(label: str) -> str:
    """The method of a ``--method`` entry: ``er:x10`` → ``er``."""
    return label.partition(":")[0]


def method_hparams(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per-method keywords from ``--rotations``/``--replay-cap`` (OnPro) and ``--hparam``."""
    out: dict[str, dict[str, Any]] = {m: {} for m in args.method}
    for label in (m for m in out if method_of(m) == "onpro"):
        for key in ("rotations", "replay_cap"):
            if getattr(args, key) is not None:
                out[label][key] = getattr(args, key)
    for key, value in args.hparam:
        method, _, name = key.rpartition(".")
        for m in [method] if method else args.method:
            if m not in out:
                raise ConfigError(f"--hparam {key}: method {m!r} is not benchmarked")
            out[m][name] = value
    for m, kw in out.items():
        check_hparams(method_of(m), kw)
    return out


def cmd_accuracy(args: argparse.Namespace) -> int:
    if args.classes % args.tasks or not 0 < args.tasks <= args.classes <= 100:
        raise ConfigError(f"--classes ({args.classes}) must be ≤ 100 and a multiple of --tasks ({args.tasks})")
    protocol = Protocol(
        dataset=args.dataset,
        classes=args.classes,
        tasks=args.tasks,
        memory=args.memory,
        model=args.model,
        width=args.width,
        train_per_class=args.train_per_class,
        hparams=method_hparams(args),
    )
    device = pick_device(args.device)
    train, test = load_cifar100(args.data_dir, "train"), load_cifar100(args.data_dir, "test")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in args.method}
    for r in range(args.runs):  # seeds outermost: methods are compared run by run as results come in
        for method in args.method:
            run = run_once(method, train, test, protocol, device, seed=args.seed + r, progress=not args.no_progress)
            results[method].append(run)
            tqdm.write(f"{method} seed {run['seed']}: final accuracy {run['final_accuracy']:.2f} %, {run['seconds']} s")
    name = args.name or f"{args.dataset}-c{args.classes}-t{args.tasks}-m{args.memory}"
    report = {
        "benchmark": "accuracy",
        "protocol": asdict(protocol),
        "runs": args.runs,
        "device": str(device),
        "machine": machine(device),
        "methods": {m: {"runs": runs, "summary": summarise_runs(runs)} for m, runs in results.items()},
    }
    for path in write_report(args.out, name, report):
        print(path)
    return 0


def task_classes(classes: int, tasks: int) -> list[np.ndarray]:
    """Task t holds classes t·k … t·k + k − 1 (k = classes / tasks), the natural order."""
    return list(np.arange(classes).reshape(tasks, classes // tasks))


def task_indices(y: np.ndarray, cls: np.ndarray, per_class: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """Indices of the first ``per_class`` samples of each class in ``cls``; shuffled if ``rng``."""
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in cls])
    return rng.permutation(idx) if rng is not None else idx


def evaluate(learner: Learner, data: LabelledArrays, tasks: list[np.ndarray], chunk: int = 500) -> list[float]:
    """Accuracy (%) of the level-0 head argmax on each task's test images."""
    to_tree = np.array([learner.labels.lookup((name,))[1] for name in data.fine_names])
    accs = []
    for cls in tasks:
        idx = task_indices(data.y, cls, None, None)
        correct = 0
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            pred = learner.predict(torch.from_numpy(data.x[part])).classes[:, 0].cpu().numpy()
            correct += int((pred == to_tree[data.y[part]]).sum())
        accs.append(100.0 * correct / len(idx))
    return accs


def run_once(
    method: str,
    train: LabelledArrays,
    test: LabelledArrays,
    protocol: Protocol,
    device: torch.device,
    *,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """One run of ``method`` (a ``--method`` entry): a fresh learner trained task by task; the accuracy
    matrix, its metrics and the compute spent learning."""
    learner = build_learner(
        method_of(method),
        protocol.model,
        train.x.shape[1:],
        train.x.dtype,
        device=device,
        seed=seed,
        buffer_size=protocol.memory,
        width=protocol.width,
        hparams=protocol.hparams.get(method, {}),
    )
    rng = np.random.default_rng(seed)
    tasks = task_classes(protocol.classes, protocol.tasks)
    order = [task_indices(train.y, cls, protocol.train_per_class, rng) for cls in tasks]
    matrix = np.zeros((len(tasks), len(tasks)))
    compute = Compute(learner)
    started, cpu_started = time.perf_counter(), time.process_time()
    bar = tqdm(total=sum(map(len, order)), desc=f"{method} seed {seed}", disable=not progress, unit="img")
    for t, idx in enumerate(order):
        for start in range(0, len(idx), protocol.batch_size):
            part = idx[start : start + protocol.batch_size]
            with compute.learning():
                learner.observe(Batch(torch.from_numpy(train.x[part]), [(train.fine_names[c],) for c in train.y[part]]))
            bar.update(len(part))
        matrix[t, : t + 1] = evaluate(learner, test, tasks[: t + 1])
        bar.set_postfix(task=t, acc=f"{np.mean(matrix[t, : t + 1]):.1f}")
    bar.close()
    return {
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "learn_cpu_seconds": round(compute.cpu_seconds, 3),
        "steps": compute.steps,
        "matrix": matrix.round(2).tolist(),
        **run_metrics(matrix),
    }


def run_metrics(matrix: np.ndarray) -> dict[str, float | None]:
    return {
        "final_accuracy": cl_metrics.final_accuracy(matrix),
        "forgetting": cl_metrics.forgetting(matrix),
        "forgetting_code": cl_metrics.forgetting_code(matrix),
        "average_incremental_accuracy": cl_metrics.average_incremental_accuracy(matrix),
    }


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("final_accuracy", "forgetting", "forgetting_code", "average_incremental_accuracy", "seconds", "cpu_seconds")
    keys += ("learn_cpu_seconds", "steps")
    out: dict[str, Any] = {k: cl_metrics.summarise([r.get(k) for r in runs]) for k in keys}
    matrices = np.array([r["matrix"] for r in runs])
    out["matrix_mean"] = matrices.mean(axis=0).round(2).tolist()
    out["matrix_std"] = (matrices.std(axis=0, ddof=1) if len(runs) > 1 else 0 * matrices[0]).round(2).tolist()
    return out
