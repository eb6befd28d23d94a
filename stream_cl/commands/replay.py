"""``stream-cl replay``: send a recorded-stream file to a Kafka topic (``stream-cl run --source FILE`` learns it
directly)."""

from __future__ import annotations

import argparse
import logging

from consumers.producer import COMPRESSION, produce_messages
from consumers.recorded import read_messages
from stream_cl.commands.record import KAFKA_SECTIONS, kafka_url
from stream_cl.commands.settings import add_settings, config_from

log = logging.getLogger("stream_cl")


def _speed(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="send a recorded stream to a Kafka topic",
        description="Send a recorded stream to a topic, as fast as possible or paced by its timestamps.",
    )
    p.add_argument("file", help="recorded-stream file")
    p.add_argument("--to", required=True, type=kafka_url, help="kafka://HOST:PORT/TOPIC")
    p.add_argument(
        "--speed",
        type=_speed,
        default=None,
        help="pace by the recorded timestamps, X times faster (default: as fast as possible)",
    )
    p.add_argument(
        "--keep-partitions", action="store_true", help="send each message to its recorded partition, not by key"
    )
    p.add_argument(
        "--keep-timestamps",
        action="store_true",
        help="send each message with its recorded timestamp, not the time of sending (event time, which delayed "
        "labels join and expire by; a topic's time-based retention then counts from the recorded times)",
    )
    p.add_argument("--compression", default="none", choices=COMPRESSION, help="batch compression (default: none)")
    add_settings(p, KAFKA_SECTIONS, printable=False)
    p.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    messages = read_messages(args.file)
    url = args.to
    count = produce_messages(
        url.bootstrap,
        url.topic,
        messages,
        speed=args.speed,
        keep_partitions=args.keep_partitions,
        keep_timestamps=args.keep_timestamps,
        compression=args.compression,
        client_options=config_from(args).kafka.client_options(),
    )
    log.info("replayed %d messages from %s to %s", count, args.file, url)
    return 0
