"""``stream-cl bench hle``: HLE streams (single/dual-label, multi-depth) learned by PL-FMS, ER and OnPro.

Each run builds the seeded stream (:mod:`consumers.hle`), feeds it in micro-batches of
``batch_size / 2`` samples (PL-FMS's temporary batch), and every ``eval_period`` samples (and at the
end) predicts the test images and scores each level on the test images whose class at that level
has been seen (anytime evaluation), with the paper's parent rule on single-depth setups
(:func:`monitoring.hierarchy.level_correct`). Per level it reports A_auc, A_last and class-wise
F_last, mean ± sample std over the seeds (``--runs`` or ``--seeds``), and each run's compute (optimizer
steps, CPU-seconds of learning); the report is written by :mod:`stream_cl.bench.hle_report`.

``--protocol`` names a preset of the protocol knobs (:data:`PROTOCOLS`); a flag given explicitly
overrides its value. ``--hparam KEY=VALUE`` (repeatable) sets a hyper-parameter of every chosen method
that takes it, on top of the protocol's settings. ``--jobs N`` learns N (method, seed) runs at once, each
in its own process. A report keeps the runs of other (method, seed) pairs of the same protocol, so
``--seeds`` can add seeds to it later.

A run saves its progress at every evaluation (``OUT/.progress/METHOD-seedSEED.pt``: the learner's state,
the curves so far and the compute spent) and a run of the same protocol, method, seed and code started
again continues from there -- learning exactly what it would have learned without the interruption -- so a
seed of several CPU-hours survives a stopped machine. The file is removed when the run is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import stream_cl
from consumers.datasets import LabelledArrays, load_cifar100
from consumers.hle import CIFAR100_TAXONOMY, SETUPS, build, full_path
from monitoring.hierarchy import anytime_accuracy, class_accuracy, final_forgetting, level_correct
from stream_cl.bench.compute import Compute
from stream_cl.bench.hle_report import PROTOCOL_KEYS, protocol_conflict, write_report
from stream_cl.build import build_learner
from stream_cl.config import parse_hparam
from stream_cl.device import pick_device
from stream_cl.learner import Batch, Learner
from stream_cl.methods import METHODS, hyper_parameters
from stream_cl.models import MODELS

PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper": {
        "runs": 3, "per_class": None, "test_per_class": None, "model": "resnet18", "width": None,
        "buffer_size": 2000, "batch_size": 16, "online_iter": 3.0, "imp_update_period": 5, "eval_period": 1000,
    },
    "whole-tree": {
        "runs": 3, "per_class": 200, "test_per_class": None, "model": "resnet18-reduced", "width": 20,
        "buffer_size": 2000, "batch_size": 16, "online_iter": 1.0, "imp_update_period": 20, "eval_period": 2000,
    },
}  # fmt: skip
"""Protocol presets. ``paper``: the HLE code's CIFAR-100 settings (a GPU's work; the paper's ResNet-34 is not
in :mod:`stream_cl.models`). ``whole-tree``: a CPU protocol over the whole label tree -- all 100 fine
classes under the 20 coarse ones, 200 training images per fine class (a 20,000-sample single-label
stream), the reduced ResNet-18 (nf 20), memory 2,000, the whole test split, one update per sample and a
memory re-scoring every 20 updates (the paper: 3 and 5) to fit a few CPU-hours per seed."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hle", help="HLE setups: per-level anytime accuracy of PL-FMS / ER / OnPro")
    keep = argparse.SUPPRESS  # preset knobs: absent unless given, then filled from --protocol
    p.add_argument("--protocol", choices=PROTOCOLS, default="paper", help="preset of the knobs below (default paper)")
    p.add_argument("--setup", choices=SETUPS, default="single")
    p.add_argument("--method", nargs="+", default=["pl-fms", "er"], choices=sorted(METHODS))
    p.add_argument("--runs", type=int, default=keep, help="seeds 0..runs-1 (class and sample order, init)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="these seeds instead of 0..runs-1: runs of other seeds already in the report are kept",
    )
    p.add_argument("--data-dir", required=True, help="folder with the CIFAR-100 files")
    p.add_argument("--per-class", type=int, default=keep, help="train images per fine class (paper: all 500)")
    p.add_argument("--test-per-class", type=int, default=keep, help="test images per fine class (default all 100)")
    p.add_argument("--model", choices=MODELS, default=keep)
    p.add_argument("--width", type=int, default=keep, help="ResNet nf override")
    p.add_argument("--buffer-size", type=int, default=keep)
    p.add_argument("--batch-size", type=int, default=keep, help="PL-FMS batch B; the stream arrives B/2 at a time")
    p.add_argument("--online-iter", type=float, default=keep, help="PL-FMS / ER-HLE updates per stream sample")
    p.add_argument("--imp-update-period", type=int, default=keep, help="PL-FMS updates between memory re-scorings")
    p.add_argument("--onpro-rotations", type=int, default=None, help="OnPro rotation views (default: its own)")
    p.add_argument("--onpro-replay-cap", type=int, default=None, help="OnPro replay batch cap (default: its own)")
    p.add_argument("--eval-period", type=int, default=keep, help="stream samples between evaluations")
    p.add_argument(
        "--hparam", action="append", default=[], type=parse_hparam, metavar="KEY=VALUE",
        help="hyper-parameter of every chosen method that takes it, repeatable (e.g. --hparam pseudo_label=false)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs learned at once, each in its own process")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/hle", help="folder of the report folders")
    p.add_argument("--name", default=None, help="report folder under --out (default: SETUP, or SETUP-PROTOCOL)")
    p.set_defaults(handler=cmd_hle)


_SET_BY_FLAGS = {
    "seed": "--runs", "online_iter": "--online-iter", "batch_size": "--batch-size",
    "imp_update_period": "--imp-update-period", "rotations": "--onpro-rotations", "replay_cap": "--onpro-replay-cap",
}  # fmt: skip
"""Hyper-parameters the bench sets from its own flags (the report's protocol line names those)."""


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every preset knob not given on the command line taken from ``--protocol``, and the
    ``--hparam`` pairs as ``hparams`` (a dict) and ``method_hparams`` (each method's share)."""
    preset = PROTOCOLS[args.protocol]
    given = dict(args.hparam)
    return argparse.Namespace(**(preset | vars(args)), hparams=given, method_hparams=split_hparams(args.method, given))


def split_hparams(methods: list[str], given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's share of ``given``: the keys its constructor takes.

    Raises
    ------
    ValueError
        For a key the bench sets from one of its flags, or that none of ``methods`` takes.
    """
    for key in given:
        if key in _SET_BY_FLAGS:
            raise ValueError(f"--hparam {key}: the bench sets it from {_SET_BY_FLAGS[key]}")
    known = {method: set(hyper_parameters(method)) for method in methods}
    unknown = sorted(key for key in given if not any(key in names for names in known.values()))
    if unknown:
        names = ", ".join(sorted(set().union(*known.values())))
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for methods {', '.join(methods)}; known: {names}"
        )
    return {method: {k: v for k, v in given.items() if k in known[method]} for method in methods}


def cmd_hle(args: argparse.Namespace) -> int:
    args = resolve(args)
    device = pick_device(args.device)
    seeds = sorted(set(args.seeds)) if args.seeds else list(range(args.runs))
    todo = [(method, seed) for method in args.method for seed in seeds]
    out = Path(args.out) / (args.name or (args.setup if args.protocol == "paper" else f"{args.setup}-{args.protocol}"))
    conflict = protocol_conflict(out, vars(args))
    if conflict:  # found before hours of runs, not after
        print(f"stream-cl bench hle: {conflict}; choose another --name or --out", file=sys.stderr)
        return 2
    args.progress_dir = str(out / ".progress")
    if args.jobs > 1:
        spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(_run_in_process, m, s, args, str(device)) for m, s in todo]
            runs = [f.result() for f in futures]
    else:
        runs = [_run_in_process(m, s, args, str(device)) for m, s in todo]
    out = write_report(out, vars(args) | {"device": str(device), "stream_length": runs[0]["stream_length"]}, runs)
    _forget_progress(args, todo)
    print(f"report written to {out}")
    return 0


@functools.cache
def _data(data_dir: str) -> tuple[LabelledArrays, LabelledArrays]:
    return load_cifar100(data_dir, "train"), load_cifar100(data_dir, "test")


def _run_in_process(method: str, seed: int, args: argparse.Namespace, device: str) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    train, test = _data(args.data_dir)
    return run_one(method, seed, args, train, test, _test_rows(test, args.test_per_class), torch.device(device))


def hparams(method: str, args: argparse.Namespace, stream_length: int, feature_dim: int, seed: int) -> dict[str, Any]:
    """Method settings of the protocol; the rest are each method's defaults."""
    if method == "er-hle":
        return {"online_iter": args.online_iter, "batch_size": args.batch_size, "seed": seed}
    if method == "pl-fms":
        return {
            "online_iter": args.online_iter,
            "batch_size": args.batch_size,
            "total_stream_length": stream_length,
            "imp_update_period": args.imp_update_period,
            "fms_factor": 2.0 if args.setup == "multi" else 1.0,
            "seed": seed,
        }
    if method in ("onpro", "onpro-hle"):
        knobs = {"rotations": args.onpro_rotations, "replay_cap": args.onpro_replay_cap}
        return {"proj_dim": min(128, feature_dim), "seed": seed} | {k: v for k, v in knobs.items() if v is not None}
    return {}


def run_one(
    method: str,
    seed: int,
    args: argparse.Namespace,
    train: LabelledArrays,
    test: LabelledArrays,
    test_rows: np.ndarray,
    device: torch.device,
) -> dict[str, Any]:
    """Learn one seeded stream with one method; per-level curves and summaries."""
    stream = build(args.setup, train, seed=seed, per_class=args.per_class)
    taxonomy = CIFAR100_TAXONOMY if args.setup == "multi" else None
    test_paths = [full_path(test, int(r), taxonomy) for r in test_rows]
    shape, dtype = train.x.shape[1:], train.x.dtype
    progress = _progress_path(args, method, seed)
    key = _progress_key(args, method, seed, device)
    done = _load_progress(progress, key) if progress else None
    if done and "finished" in done:
        return done["finished"]
    learner = _learner(method, seed, args, shape, dtype, device, len(stream))
    compute = Compute(learner)
    if done:
        learner.load_state_dict(done["learner"])
        compute.steps, compute.cpu_seconds = done["steps"], done["learn_cpu_seconds"]
        print(f"stream-cl bench hle: {method} seed {seed} continues from sample {done['position']}", file=sys.stderr)
    step, since = args.batch_size // 2, 0
    start = done["position"] if done else 0
    curves: dict[int, list[tuple[int, float]]] = done["curves"] if done else {}
    head_only: dict[int, float] = done["head_only"] if done else {}
    history: dict[int, dict[int, list[float]]] = done["history"] if done else {}
    resumed_at: list[int] = done["resumed_at"] + [start] if done else []
    load_before = os.getloadavg()[0]
    started = time.perf_counter() - (done["seconds"] if done else 0.0)
    cpu_started = time.process_time() - (done["cpu_seconds"] if done else 0.0)
    bar = tqdm(total=len(stream), initial=start, desc=f"{method} seed {seed}", unit="rec", dynamic_ncols=True)
    for i in range(start, len(stream), step):
        rows = stream.rows[i : i + step]
        with compute.learning():
            learner.observe(Batch(torch.from_numpy(train.x[rows]), list(stream.paths[i : i + step])))
        since += len(rows)
        bar.update(len(rows))
        if since >= args.eval_period or i + step >= len(stream):
            since = 0
            levels = evaluate(learner, test.x[test_rows], test_paths, parent_rule=args.setup != "multi")
            for lvl, (acc, per_class, own_head) in levels.items():
                curves.setdefault(lvl, []).append((min(i + step, len(stream)), acc))
                head_only[lvl] = own_head
                for cls, value in per_class.items():
                    history.setdefault(lvl, {}).setdefault(cls, []).append(value)
            if progress and i + step < len(stream):
                _save_progress(progress, {
                    "key": key, "position": i + step, "curves": curves, "head_only": head_only, "history": history,
                    "resumed_at": resumed_at, "steps": compute.steps, "learn_cpu_seconds": compute.cpu_seconds,
                    "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                    "learner": learner.state_dict(),
                })  # fmt: skip
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    summary = {}
    for lvl in sorted(curves):
        a_auc, a_last = anytime_accuracy([acc for _, acc in curves[lvl]])
        summary[str(lvl)] = {
            "A_auc": a_auc,
            "A_last": a_last,
            "F_last": final_forgetting(history.get(lvl, {})),
            "A_last_head_only": head_only[lvl],
            "curve": curves[lvl],
        }
    result = {
        "method": method,
        "seed": seed,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "learn_cpu_seconds": compute.cpu_seconds,
        "steps": compute.steps,
        "load_average": [load_before, os.getloadavg()[0]],
        "stream_length": len(stream),
        "hparams": args.method_hparams[method],
        "levels": summary,
    } | ({"resumed_at": resumed_at} if resumed_at else {})
    if progress:  # kept until the report holds it: other runs of this command may still be learning
        _save_progress(progress, {"key": key, "finished": result})
    return result


def _progress_path(args: argparse.Namespace, method: str, seed: int) -> Path | None:
    folder = getattr(args, "progress_dir", None)
    return Path(folder) / f"{method}-seed{seed}.pt" if folder else None


def _progress_key(args: argparse.Namespace, method: str, seed: int, device: torch.device) -> str:
    """What a saved run must share with this one to be continued: protocol, method, seed, device, threads (they
    change floating-point sums), data folder, torch and NumPy versions, and code (its sources, committed or not)."""
    knobs = {k: getattr(args, k, None) for k in (*PROTOCOL_KEYS, "threads")}
    knobs["data_dir"] = str(Path(args.data_dir).resolve())  # ./data and data are one folder
    knobs["versions"] = [torch.__version__, np.__version__]
    return json.dumps([knobs, method, seed, device.type, _code_digest()], sort_keys=True, default=str)


@functools.cache
def _code_digest() -> str:
    """SHA-256 over the project's Python sources (names and bytes), wherever it is installed."""
    digest = hashlib.sha256()
    root = Path(stream_cl.__file__).resolve().parent.parent
    for package in ("stream_cl", "consumers", "buffers", "monitoring"):
        for path in sorted(p for p in (root / package).rglob("*.py") if p.is_file()):  # not an editor's lock link
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _save_progress(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a kill mid-write leaves the previous progress whole


def _load_progress(path: Path, key: str) -> dict[str, Any] | None:
    """The saved progress of this very run; None to start afresh."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file costs the progress, never the run
        print(f"stream-cl bench hle: {path} unreadable ({exc}); starting afresh", file=sys.stderr)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        print(f"stream-cl bench hle: {path} is another protocol's or code's run; starting afresh", file=sys.stderr)
        return None
    return state


def _forget_progress(args: argparse.Namespace, todo: list[tuple[str, int]]) -> None:
    for method, seed in todo:
        _progress_path(args, method, seed).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other runs' progress may still be there
        Path(args.progress_dir).rmdir()


def evaluate(
    learner: Learner, x: np.ndarray, paths: list[tuple[str, ...]], *, parent_rule: bool, chunk: int = 500
) -> dict[int, tuple[float, dict[int, float], float]]:
    """Per level with seen classes: (accuracy, per-class accuracy, head-only accuracy) on the test images."""
    tree = learner.labels
    if not tree.depth:
        return {}
    predicted = np.concatenate(
        [learner.predict(torch.from_numpy(x[i : i + chunk])).classes.cpu().numpy() for i in range(0, len(x), chunk)]
    )
    maps = [tree.parent_map(lvl) for lvl in range(tree.depth)]
    out = {}
    for lvl in range(min(tree.depth, max(len(p) for p in paths))):
        prefixes = {p[: lvl + 1] for p in paths if len(p) > lvl}
        known = {p: tree.lookup(p)[1] for p in prefixes}
        y = np.array([known.get(p[: lvl + 1], -1) if len(p) > lvl else -1 for p in paths])
        seen = y >= 0
        if not seen.any():
            continue
        level = np.full(int(seen.sum()), lvl)
        correct = level_correct(predicted[seen], level, y[seen], maps, parent_rule=parent_rule)
        head_only = level_correct(predicted[seen], level, y[seen])
        out[lvl] = (float(correct.mean()), class_accuracy(correct, y[seen]), float(head_only.mean()))
    return out


def _learner(
    method: str,
    seed: int,
    args: argparse.Namespace,
    shape: tuple[int, ...],
    dtype: np.dtype,
    device: torch.device,
    stream_length: int,
) -> Learner:
    width = args.width
    feature_dim = 8 * (width or (64 if args.model == "resnet18" else 20))
    params = hparams(method, args, stream_length, feature_dim, seed) | args.method_hparams[method]
    return build_learner(
        method,
        args.model,
        shape,
        dtype,
        device=device,
        seed=seed,
        buffer_size=args.buffer_size,
        width=width,
        hparams=params,
    )


def _test_rows(test: LabelledArrays, per_class: int | None) -> np.ndarray:
    """The first ``per_class`` test images of every fine class (all when None)."""
    rows = [np.flatnonzero(test.y == c)[:per_class] for c in range(len(test.fine_names))]
    return np.concatenate(rows)
