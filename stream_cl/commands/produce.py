"""``stream-cl produce``: turn a dataset on disk into a Kafka topic or a recorded-stream file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from consumers.datasets import load_cifar100, load_fashion_mnist
from consumers.produce import FORMATS, ORDERS, dataset_messages
from consumers.producer import COMPRESSION, produce_messages
from consumers.recorded import write_messages
from consumers.urls import KafkaUrl, is_kafka_url
from consumers.wire import MAX_SAMPLES
from stream_cl.commands.record import KAFKA_SECTIONS
from stream_cl.commands.settings import add_settings, config_from

log = logging.getLogger("stream_cl")

DATASETS = {"cifar100": load_cifar100, "fashion-mnist": load_fashion_mnist}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "produce",
        help="turn a dataset into a Kafka topic or a recorded-stream file",
        description="Encode a dataset (hierarchical coarse/fine labels) in the wire format and send or write it.",
    )
    p.add_argument("dataset", choices=sorted(DATASETS), help="dataset to read from --data-dir")
    p.add_argument("--to", required=True, help="kafka://HOST:PORT/TOPIC or an output file (.rec.gz)")
    p.add_argument("--format", default="binary", choices=FORMATS, help="wire format (default: binary)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="directory holding the dataset files")
    p.add_argument("--split", default="train", choices=("train", "test"), help="dataset split (default: train)")
    p.add_argument("--limit", type=int, default=None, help="use a random subset of this many samples")
    p.add_argument("--order", default="class-incremental", choices=ORDERS, help="stream order")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the order (default: 0)")
    p.add_argument(
        "--samples-per-message",
        type=_samples_per_message,
        default=1,
        metavar="N",
        help="samples per message: 1 writes wire format 1, more writes wire format 2 (default: 1)",
    )
    p.add_argument("--compression", default="none", choices=COMPRESSION, help="batch compression (default: none)")
    add_settings(p, KAFKA_SECTIONS, printable=False)
    p.set_defaults(handler=cmd_produce)


def _samples_per_message(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"must be in 1-{MAX_SAMPLES}, got {n}")
    return n


def cmd_produce(args: argparse.Namespace) -> int:
    data = DATASETS[args.dataset](args.data_dir, args.split)
    name = f"{args.dataset}-{args.split}"
    per_message = args.samples_per_message
    messages = dataset_messages(
        data, name, fmt=args.format, order=args.order, seed=args.seed, limit=args.limit, samples_per_message=per_message
    )
    samples = min(len(data), args.limit) if args.limit else len(data)
    messages = tqdm(messages, total=-(-samples // per_message), unit="msg", desc="produce")
    if is_kafka_url(args.to):
        url = KafkaUrl.parse(args.to)
        options = config_from(args).kafka.client_options()
        count = produce_messages(
            url.bootstrap, url.topic, messages, compression=args.compression, client_options=options
        )
    else:
        count = write_messages(args.to, messages)
    log.info("produced %d %s messages (%d samples) of %s to %s", count, args.format, samples, name, args.to)
    return 0
