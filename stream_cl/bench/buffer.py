"""``stream-cl bench buffer``: throughput of the replay stores, memory and Redis.

For each backend and capacity (3x32x32 uint8 samples, micro-batches of ``--batch``): fill the
buffer, then time steady-state inserts, ``sample(--replay)`` draws and whole learner steps
(``sample_then_add``, plus the two-call form for comparison), count Redis round trips per step
with a counting connection, and measure bytes per stored sample from Redis' ``used_memory``.
Starts its own ``redis-server`` (no persistence unless ``--aof``) when ``--redis`` is not given.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
import torch
from tqdm import tqdm

from buffers.memory import MemoryStore
from buffers.open import make_policy, redis_client
from buffers.redis import RedisStore
from buffers.store import ReplayStore
from stream_cl.bench.buffer_report import write_report
from stream_cl.errors import StreamClError

SHAPE = (3, 32, 32)


class CountingConnection(redis.Connection):
    """A redis-py connection counting round trips: one per packed send (a command or a whole pipeline)."""

    round_trips = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.round_trips += 1
        super().send_packed_command(command, check_health)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("buffer", help="inserts/s, samples/s, round trips and bytes per sample of the replay stores")
    p.add_argument("--capacity", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--backend", nargs="+", choices=["memory", "redis"], default=["memory", "redis"])
    p.add_argument("--policy", nargs="+", choices=["reservoir", "class-balanced"], default=["reservoir"])
    p.add_argument("--batch", type=int, default=10, help="samples per insert (stream micro-batch)")
    p.add_argument("--replay", type=int, default=10, help="samples per draw (replay batch)")
    p.add_argument("--calls", type=int, default=1000, help="timed calls per measurement")
    p.add_argument("--repeats", type=int, default=3, help="each measurement is the best of this many runs")
    p.add_argument("--redis", default=None, help="redis:// URL to use (default: start a redis-server)")
    p.add_argument("--aof", action="store_true", help="the started redis-server writes an AOF (fsync everysec)")
    p.add_argument("--out", default="benchmarks/buffer", help="report folder")
    p.set_defaults(handler=cmd_buffer)


def cmd_buffer(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    rows = []
    with contextlib.ExitStack() as stack:
        url = args.redis
        if url is None and "redis" in args.backend:
            url = stack.enter_context(redis_server(aof=args.aof))
        for policy in args.policy:
            for backend in args.backend:
                for capacity in args.capacity:
                    rows.append(measure(backend, policy, capacity, args, url))
                    print(_line(rows[-1]))
        server = _server_info(url) if url else {}
    write_report(Path(args.out), vars(args) | {"redis_server": server}, rows)
    print(f"report written to {args.out}")
    return 0


def measure(backend: str, policy: str, capacity: int, args: argparse.Namespace, url: str | None) -> dict[str, Any]:
    """One backend and policy at one capacity: fill, then time inserts, draws and learner steps."""
    gen = torch.Generator().manual_seed(capacity)
    pool = torch.randint(0, 256, (64 * args.batch, *SHAPE), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 100, (len(pool),), generator=gen)
    level = torch.zeros(len(pool), dtype=torch.long)

    def part(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = (i * args.batch) % (len(pool) - args.batch)
        return pool[s : s + args.batch], labels[s : s + args.batch], level[s : s + args.batch]

    store, used_memory = _open(backend, policy, capacity, url)
    base = used_memory()
    for i in tqdm(range(-(-capacity // args.batch)), desc=f"{backend} {capacity}: fill", leave=False):
        store.add(*part(i))
    bytes_per_sample = (used_memory() - base) / len(store) if backend == "redis" else store.stats().nbytes / len(store)
    calls, repeats, name = args.calls, args.repeats, f"{backend} {policy} {capacity}"
    insert_s = _time(lambda i: store.add(*part(i)), calls, repeats, f"{name}: add")
    sample_s = _time(lambda i: store.sample(args.replay), calls, repeats, f"{name}: sample")
    CountingConnection.round_trips = 0
    step_s = _time(lambda i: store.sample_then_add(args.replay, *part(i)), calls, repeats, f"{name}: step")
    trips = CountingConnection.round_trips / (calls * repeats)
    CountingConnection.round_trips = 0
    two_s = _time(lambda i: (store.sample(args.replay), store.add(*part(i))), calls, repeats, f"{name}: 2 calls")
    two_trips = CountingConnection.round_trips / (calls * repeats)
    if errors := store.stats().errors:
        raise StreamClError(f"{errors} buffer errors during the benchmark")
    if backend == "redis":
        store.clear()
    return {
        "backend": backend,
        "policy": policy,
        "capacity": capacity,
        "inserts_per_s": calls * args.batch / insert_s,
        "samples_per_s": calls * args.replay / sample_s,
        "sample_calls_per_s": calls / sample_s,
        "steps_per_s": calls / step_s,
        "round_trips_per_step": trips,
        "steps_per_s_two_calls": calls / two_s,
        "round_trips_per_step_two_calls": two_trips,
        "bytes_per_sample": bytes_per_sample,
        "payload_bytes_per_sample": int(torch.tensor(SHAPE).prod()),
    }


def _open(backend: str, policy: str, capacity: int, url: str | None) -> tuple[ReplayStore, Callable[[], int]]:
    if backend == "memory":
        return MemoryStore(capacity, policy=make_policy(policy, capacity), seed=0), lambda: 0
    client = redis_client(url)
    client.connection_pool.connection_class = CountingConnection
    store = RedisStore(client, capacity, name=f"bench-{policy}-{capacity}", policy=policy, seed=0)
    store.clear()
    return store, lambda: int(client.info("memory")["used_memory"])


def _time(fn: Callable[[int], object], calls: int, repeats: int, desc: str) -> float:
    """Seconds for ``calls`` calls, the best of ``repeats`` runs (other load only ever slows a run down)."""
    best = float("inf")
    for r in range(repeats):
        started = time.perf_counter()
        for i in tqdm(range(calls), desc=f"{desc} ({r + 1}/{repeats})", leave=False):
            fn(r * calls + i)
        best = min(best, time.perf_counter() - started)
    return best


@contextlib.contextmanager
def redis_server(*, aof: bool = False) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StreamClError("redis-server is not installed (apt-get install redis-server), or pass --redis URL")
    with tempfile.TemporaryDirectory() as workdir:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        persist = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", *persist, "--dir", workdir]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis(port=port)
            for _ in range(200):
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    break
                time.sleep(0.025)
            client.close()
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def _server_info(url: str) -> dict[str, Any]:
    info = redis.Redis.from_url(url).info("server")
    return {"version": info["redis_version"], "redis_py": redis.__version__}


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['backend']:>6} {row['policy']:>14} M={row['capacity']:>6}: {row['inserts_per_s']:>9.0f} inserts/s "
        f"{row['samples_per_s']:>9.0f} samples/s {row['steps_per_s']:>7.0f} steps/s "
        f"({row['round_trips_per_step']:.2f} round trips) {row['bytes_per_sample']:.0f} B/sample"
    )
