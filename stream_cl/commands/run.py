"""``stream-cl run``: learn a stream once (test-then-train) and print a summary."""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

from buffers.open import POLICIES
from consumers.prefetch import Prefetcher
from consumers.urls import is_kafka_url
from monitoring.drift import DEFAULT_DRIFT
from monitoring.probe import ProbeSet
from stream_cl.device import pick_device
from stream_cl.errors import StreamClError
from stream_cl.methods import METHODS
from stream_cl.models import MODELS
from stream_cl.run import run_stream
from stream_cl.sources import open_dead_letters, open_source
from stream_cl.wiring import check_settings, drift_monitor, learner_factory, make_metrics, run_options

log = logging.getLogger("stream_cl")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="learn a stream once, then print a summary",
        description="Learn a stream test-then-train and print a summary.",
    )
    add_run_arguments(run)
    run.add_argument(
        "--kafka-session-timeout-ms", type=_positive(int), default=10000, help="Kafka group session timeout"
    )
    run.add_argument(
        "--prefetch",
        type=int,
        default=0,
        metavar="BATCHES",
        help="read and decode a recorded stream this many batches ahead on a background thread (default: 0, off; "
        "a Kafka source always fetches and decodes ahead)",
    )
    run.set_defaults(handler=cmd_run)


def default_stream() -> Path:
    """The recorded stream shipped with the package (class-incremental Fashion-MNIST slice)."""
    return Path(str(resources.files("consumers.data").joinpath("fashion_mnist_ci.rec.gz")))


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def parse_hparam(text: str) -> tuple[str, bool | int | float | str | None]:
    """``KEY=VALUE`` → (key, value); the value becomes a bool, None, int or float where it reads as one."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    low = value.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    if low in ("none", "null"):
        return key.strip(), None
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    return key.strip(), value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``serve``."""
    p.add_argument(
        "--source",
        default=None,
        help="kafka://HOST:PORT/TOPIC or a recorded-stream file (default: the shipped Fashion-MNIST stream)",
    )
    p.add_argument("--group", default="stream-cl", help="Kafka consumer group (default: stream-cl)")
    p.add_argument(
        "--until-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop once no record arrived for this long (default: a Kafka source runs until stopped)",
    )
    p.add_argument("--dead-letter-out", default=None, help="also write dead letters to this recorded-stream file")
    p.add_argument("--dead-letter-topic", default=None, help="Kafka dead-letter topic (default: TOPIC.dlq)")
    p.add_argument("--method", default="er", choices=sorted(METHODS), help="learning method (default: er)")
    p.add_argument("--model", default="mlp", choices=MODELS, help="backbone (default: mlp)")
    p.add_argument("--width", type=_positive(int), default=None, help="MLP hidden size or ResNet nf override")
    p.add_argument(
        "--hparam",
        action="append",
        type=parse_hparam,
        default=[],
        metavar="KEY=VALUE",
        help="method hyper-parameter, repeatable (e.g. --hparam rotations=4)",
    )
    p.add_argument(
        "--buffer",
        default="memory",
        help="replay buffer: 'memory' (default) or a shared Redis buffer 'redis[s]://[user:pass@]host:port/db?name=NAME'",
    )
    p.add_argument(
        "--buffer-policy",
        default="reservoir",
        choices=sorted(POLICIES),
        help="which samples the buffer keeps (default: reservoir; Redis runs reservoir or class-balanced)",
    )
    p.add_argument("--buffer-size", type=_positive(int), default=500, help="replay buffer capacity (default: 500)")
    p.add_argument("--batch-size", type=_positive(int), default=10, help="stream micro-batch size (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--max-records", type=_positive(int), default=None, help="stop after this many records")
    p.add_argument(
        "--probe-fraction",
        type=float,
        default=0.05,
        help="share of labelled records held out to measure accuracy and forgetting (default: 0.05)",
    )
    p.add_argument(
        "--probe-every",
        type=_positive(int),
        default=500,
        help="learned records between probe evaluations (default: 500)",
    )
    p.add_argument("--metrics-port", type=int, default=9108, help="serve /metrics on this port; 0 disables")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="bind address of /metrics (default: 127.0.0.1)")
    p.add_argument(
        "--drift",
        default=DEFAULT_DRIFT,
        help="drift detectors as detector:signal[:name=value...], comma-separated; detectors adwin, page-hinkley, "
        f"kswin; signals error, loss, uncertainty (default: {DEFAULT_DRIFT})",
    )
    p.add_argument("--no-drift", action="store_true", help="run no drift detectors")
    p.add_argument(
        "--max-class-series",
        type=_positive(int),
        default=100,
        help="most per-class metric series (class accuracy, forgetting, buffer count) exported (default: 100)",
    )
    p.add_argument("--summary-json", type=Path, default=None, help="write the final summary to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_run(args: argparse.Namespace) -> int:
    settings = vars(args)
    check_settings(settings)
    device = pick_device(args.device)
    spec = args.source or str(default_stream())
    dead_letters = open_dead_letters(
        spec, dead_letter_out=args.dead_letter_out, dead_letter_topic=args.dead_letter_topic
    )
    try:
        source = open_source(spec, group=args.group, session_timeout_ms=args.kafka_session_timeout_ms)
    except BaseException:
        if dead_letters is not None:
            dead_letters.close()
        raise
    metrics = make_metrics(settings, device)
    drift = drift_monitor(settings, metrics)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_addr)
        log.info("serving metrics on http://%s:%d/metrics", args.metrics_addr, args.metrics_port)
    make_learner = learner_factory(settings, device)
    options = run_options(settings)
    if args.prefetch < 0:
        raise StreamClError(f"--prefetch must be >= 0, got {args.prefetch}")
    if args.prefetch > 0 and not is_kafka_url(args.source or ""):
        source = Prefetcher(source, depth=args.prefetch, batch_size=args.batch_size, max_records=args.max_records)
    with source, dead_letters or nullcontext():
        summary, _ = run_stream(
            source,
            make_learner,
            metrics,
            ProbeSet(fraction=args.probe_fraction, seed=args.seed),
            options,
            dead_letters=dead_letters,
            drift=drift,
        )
    summary.model, summary.device = args.model, str(device)
    print(summary.render())
    if args.summary_json:
        summary.write(args.summary_json)
    return 0
