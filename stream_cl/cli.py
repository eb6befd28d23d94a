"""Command line: ``stream-cl <command>``. Each command lives in ``stream_cl/commands/``."""

from __future__ import annotations

import argparse
import logging
import sys

from consumers.recorded import RecordedStreamError
from stream_cl.commands import bench, checkpoint, produce, record, replay, run, serve
from stream_cl.errors import StreamClError

COMMANDS = [run, bench, serve, checkpoint, produce, record, replay]
"""Command modules; each has ``register(subparsers)`` setting ``handler`` on its parser."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-cl", description="Online continual learning on data streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stream-cl`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except (StreamClError, RecordedStreamError, FileNotFoundError, ValueError, OSError) as err:
        print(f"stream-cl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
