"""``stream-cl record``: copy a Kafka topic into a recorded-stream file."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from consumers.capture import record_topic
from consumers.urls import KafkaUrl
from stream_cl.commands.settings import add_settings, config_from

KAFKA_SECTIONS = ("kafka",)
"""The Kafka tools take the security settings ``run`` and ``serve`` take, from flags, STREAMCL_KAFKA_* or a file."""

log = logging.getLogger("stream_cl")


def kafka_url(text: str) -> KafkaUrl:
    """argparse type for ``kafka://HOST:PORT/TOPIC``."""
    try:
        return KafkaUrl.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record",
        help="record a Kafka topic into a file",
        description="Record every partition of a topic from its beginning (keys, values, headers, timestamps).",
    )
    p.add_argument("--source", required=True, type=kafka_url, help="kafka://HOST:PORT/TOPIC")
    p.add_argument("--out", required=True, type=Path, help="recorded-stream file to write (.rec.gz)")
    p.add_argument("--until-idle", type=float, default=None, metavar="S", help="stop after S seconds without a message")
    add_settings(p, KAFKA_SECTIONS, printable=False)
    p.set_defaults(handler=cmd_record)


def cmd_record(args: argparse.Namespace) -> int:
    kafka = config_from(args).kafka
    stop = threading.Event()
    with stop_on_signals(stop):
        count = record_topic(
            args.source.bootstrap,
            args.source.topic,
            args.out,
            until_idle_s=args.until_idle,
            client_options=kafka.client_options(),
            stop=stop,
        )
    log.info("recorded %d messages from %s to %s", count, args.source, args.out)
    return 0


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT set ``stop``: recording ends between batches and the file is closed
    whole (killed by SIGTERM's default action instead, the gzip stream would end mid-block, its tail lost)."""

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
