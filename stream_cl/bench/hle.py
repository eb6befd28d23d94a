"""``stream-cl bench hle``: HLE streams (single/dual-label, multi-depth) learned by PL-FMS, ER and OnPro.

Each run builds the seeded stream (:mod:`consumers.hle`), feeds it in micro-batches of
``batch_size / 2`` samples (PL-FMS's temporary batch), and every ``eval_period`` samples (and at the
end) predicts the test images and scores each level on the test images whose class at that level
has been seen (anytime evaluation), with the paper's parent rule on single-depth setups
(:func:`monitoring.hierarchy.level_correct`). Per level it reports A_auc, A_last and class-wise
F_last, mean ± std over ``--runs`` seeds; the report is written by :mod:`stream_cl.bench.hle_report`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from consumers.datasets import LabelledArrays, load_cifar100
from consumers.hle import CIFAR100_TAXONOMY, SETUPS, build, full_path
from monitoring.hierarchy import anytime_accuracy, class_accuracy, final_forgetting, level_correct
from stream_cl.bench.hle_report import write_report
from stream_cl.build import build_learner
from stream_cl.device import pick_device
from stream_cl.learner import Batch, Learner
from stream_cl.methods import METHODS
from stream_cl.models import MODELS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hle", help="HLE setups: per-level anytime accuracy of PL-FMS / ER / OnPro")
    p.add_argument("--setup", choices=SETUPS, default="single")
    p.add_argument("--method", nargs="+", default=["pl-fms", "er"], choices=sorted(METHODS))
    p.add_argument("--runs", type=int, default=3, help="seeds 0..runs-1 (class and sample order, init)")
    p.add_argument("--data-dir", required=True, help="folder with the CIFAR-100 files")
    p.add_argument("--per-class", type=int, default=None, help="train images per fine class (default all 500)")
    p.add_argument("--test-per-class", type=int, default=None, help="test images per fine class (default all 100)")
    p.add_argument("--model", choices=MODELS, default="resnet18")
    p.add_argument("--width", type=int, default=None, help="ResNet nf override")
    p.add_argument("--buffer-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16, help="PL-FMS batch B; the stream arrives B/2 at a time")
    p.add_argument("--online-iter", type=float, default=3.0, help="PL-FMS updates per stream sample")
    p.add_argument("--imp-update-period", type=int, default=5, help="PL-FMS updates between memory re-scorings")
    p.add_argument("--onpro-rotations", type=int, default=None, help="OnPro rotation views (default: its own)")
    p.add_argument("--onpro-replay-cap", type=int, default=None, help="OnPro replay batch cap (default: its own)")
    p.add_argument("--eval-period", type=int, default=1000, help="stream samples between evaluations")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/hle", help="report folder")
    p.set_defaults(handler=cmd_hle)


def cmd_hle(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    train, test = load_cifar100(args.data_dir, "train"), load_cifar100(args.data_dir, "test")
    test_rows = _test_rows(test, args.test_per_class)
    device = pick_device(args.device)
    runs = []
    for method in args.method:
        for seed in range(args.runs):
            runs.append(run_one(method, seed, args, train, test, test_rows, device))
    out = Path(args.out)
    write_report(
        out / args.setup, vars(args) | {"device": str(device), "stream_length": runs[0]["stream_length"]}, runs
    )
    print(f"report written to {out / args.setup}")
    return 0


def hparams(method: str, args: argparse.Namespace, stream_length: int, feature_dim: int, seed: int) -> dict[str, Any]:
    """Method settings of the protocol; the rest are each method's defaults."""
    if method == "pl-fms":
        return {
            "online_iter": args.online_iter,
            "batch_size": args.batch_size,
            "total_stream_length": stream_length,
            "imp_update_period": args.imp_update_period,
            "fms_factor": 2.0 if args.setup == "multi" else 1.0,
            "seed": seed,
        }
    if method == "onpro":
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
    learner = _learner(method, seed, args, shape, dtype, device, len(stream))
    step, since = args.batch_size // 2, 0
    curves: dict[int, list[tuple[int, float]]] = {}
    head_only: dict[int, float] = {}
    history: dict[int, dict[int, list[float]]] = {}
    started = time.perf_counter()
    bar = tqdm(total=len(stream), desc=f"{method} seed {seed}", unit="rec", dynamic_ncols=True)
    for i in range(0, len(stream), step):
        rows = stream.rows[i : i + step]
        learner.observe(Batch(torch.from_numpy(train.x[rows]), list(stream.paths[i : i + step])))
        since += len(rows)
        bar.update(len(rows))
        if since >= args.eval_period or i + step >= len(stream):
            since = 0
            levels = evaluate(learner, test.x[test_rows], test_paths, parent_rule=args.setup != "multi")
            for lvl, (acc, per_class, own_head) in levels.items():
                curves.setdefault(lvl, []).append((min(i + step, len(stream)), acc))
                head_only[lvl] = own_head
                for key, value in per_class.items():
                    history.setdefault(lvl, {}).setdefault(key, []).append(value)
    bar.close()
    seconds = time.perf_counter() - started
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
    return {"method": method, "seed": seed, "seconds": seconds, "stream_length": len(stream), "levels": summary}


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
    params = hparams(method, args, stream_length, feature_dim, seed)
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
