"""``stream-cl bench <name>``: benchmarks that write JSON + markdown + PNG reports.

Each benchmark module in ``stream_cl/bench/`` has ``register(subparsers)`` and is listed in
:data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse

from stream_cl.bench import accuracy, buffer, hle, throughput

BENCHMARKS: list = [accuracy, buffer, hle, throughput]
"""Benchmark modules; each has ``register(subparsers)`` setting ``handler`` on its parser."""


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark and write its report",
        description="Run a benchmark; reports go to benchmarks/<name>/ by default.",
    )
    names = bench.add_subparsers(dest="benchmark", required=True)
    for module in BENCHMARKS:
        module.register(names)
