"""``stream-cl bench <name>``: benchmarks that write JSON + markdown + PNG reports.

Each benchmark module in ``stream_cl/bench/`` has ``register(subparsers)``. They import matplotlib,
torchvision and the benchmark machinery, which a learner never needs, so they are imported only when
a benchmark runs: ``stream-cl --help`` and the other commands never load them, and an install
without the ``[bench]`` extra gets a one-line hint instead of an ImportError.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "accuracy": "OnPro paper protocol: accuracy matrix, final accuracy, forgetting",
    "gpu": "the GPU run: every method, AMP, CUDA graphs, OnPro's step time and FLOP rate",
    "buffer": "inserts/s, samples/s, round trips and bytes per sample of the replay stores",
    "hle": "HLE setups: per-level anytime accuracy of PL-FMS / ER / OnPro",
    "scaleout": "records/s, sync cost and accuracy of one worker and groups of workers, by synchronisation",
    "throughput": "samples/s and step latency of stream-cl against a plain PyTorch loop",
}
"""Benchmark name (module ``stream_cl.bench.<name>``) and its one-line description."""

INSTALL_HINT = "stream-cl: error: benchmarks need matplotlib: pip install 'stream-cl[bench]'"


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark and write its report",
        description="Run a benchmark; reports go to benchmarks/<name>/ by default. "
        + "; ".join(f"{name}: {text}" for name, text in BENCHMARKS.items())
        + ".",
        epilog="Each benchmark's options: stream-cl bench NAME --help",
    )
    bench.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bench.set_defaults(handler=run_benchmark)


def run_benchmark(args: argparse.Namespace) -> int:
    """Import the chosen benchmark, parse its own options and run it."""
    try:
        import matplotlib  # noqa: F401  (every benchmark report draws with it)
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    module = importlib.import_module(f"stream_cl.bench.{args.benchmark}")
    parser = argparse.ArgumentParser(prog="stream-cl bench")
    module.register(parser.add_subparsers(dest="benchmark", required=True))
    options = parser.parse_args([args.benchmark, *args.options])
    return options.handler(options)
