"""Run ``stream-cl bench hle``'s protocol with extra PL-FMS hyper-parameters (the bench has no ``--hparam``).

    python benchmarks/hle/ablation/run_ablation.py --hparam KEY=VALUE [...] --seeds 0 1 -- BENCH-HLE-ARGS

The bench's own protocol settings for PL-FMS are kept; each ``--hparam`` is added on top (and wins).
The report (the bench's own) is rewritten after every seed, so an interrupted ablation keeps what it ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from consumers.datasets import load_cifar100
from stream_cl.bench import hle
from stream_cl.bench.hle_report import write_report
from stream_cl.config import parse_hparam
from stream_cl.device import pick_device


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    own = argparse.ArgumentParser(description=__doc__)
    own.add_argument("--hparam", action="append", default=[], type=parse_hparam, metavar="KEY=VALUE")
    own.add_argument("--seeds", type=int, nargs="+", default=[0])
    mine = own.parse_args(argv[:split])
    extra = dict(mine.hparam)
    protocol = hle.hparams
    hle.hparams = lambda method, *a, **kw: protocol(method, *a, **kw) | (extra if method == "pl-fms" else {})
    parser = argparse.ArgumentParser(prog="stream-cl bench")
    hle.register(parser.add_subparsers())
    args = parser.parse_args(["hle", *argv[split + 1 :]])
    args.runs = len(mine.seeds)  # the report's protocol names how many seeds ran
    torch.set_num_threads(args.threads)
    train, test = load_cifar100(args.data_dir, "train"), load_cifar100(args.data_dir, "test")
    test_rows = hle._test_rows(test, args.test_per_class)
    device = pick_device(args.device)
    runs = []
    for method in args.method:
        for seed in mine.seeds:
            runs.append(hle.run_one(method, seed, args, train, test, test_rows, device))
            setting = vars(args) | {"device": str(device), "stream_length": runs[0]["stream_length"]}
            write_report(Path(args.out) / args.setup, setting, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
