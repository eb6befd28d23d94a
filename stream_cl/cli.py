"""Command line: ``stream-cl <command>``. Each command lives in ``stream_cl/commands/``.

Exit codes: 0 success; 1 a runtime failure (unreachable broker or Redis, unreadable file); 2 a
usage error (bad flag or setting); 3 a drain that did not finish in time; 4 a source that
delivered no record; 130 interrupted (Ctrl-C/SIGTERM on ``run``, after printing the summary).
"""

from __future__ import annotations

import argparse
import sys

from consumers.recorded import RecordedStreamError
from stream_cl import __version__
from stream_cl.commands import bench, checkpoint, produce, record, replay, run, serve
from stream_cl.errors import StreamClError
from stream_cl.logs import FORMATS, configure

COMMANDS = [run, bench, serve, checkpoint, produce, record, replay]
"""Command modules; each has ``register(subparsers)`` setting ``handler`` on its parser."""

USAGE_EXIT_CODE = 2
RUNTIME_EXIT_CODE = 1
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-cl", description="Online continual learning on data streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (also after the command)")
    parser.add_argument("--log-level", default="INFO", choices=LEVELS, type=str.upper, help="(default: INFO)")
    parser.add_argument("--log-format", default="text", choices=FORMATS, help="text, or one JSON object per line")
    parser.add_argument("--version", action="version", version=f"stream-cl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stream-cl`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "--verbose") for a in argv)  # before or after the command
    args = build_parser().parse_args([a for a in argv if a not in ("-v", "--verbose")])
    configure("DEBUG" if verbose else args.log_level, args.log_format)
    try:
        return args.handler(args)
    except RecordedStreamError as err:  # a ValueError, but an unreadable file is no usage error
        print(f"stream-cl: error: {err}", file=sys.stderr)
        return RUNTIME_EXIT_CODE
    except (StreamClError, ValueError, OSError) as err:
        print(f"stream-cl: error: {err}", file=sys.stderr)
        # What the user asked for is wrong (2), or what it needs failed and may work later (1).
        runtime = isinstance(err, OSError) or getattr(err, "retriable", False)
        return RUNTIME_EXIT_CODE if runtime else USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
