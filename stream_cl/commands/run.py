"""``stream-cl run``: learn a stream once (test-then-train) and print a summary."""

from __future__ import annotations

import argparse
import logging
import threading

from stream_cl.commands.settings import add_settings, config_from, print_config
from stream_cl.config import SECTIONS, SERVICE_ONLY

log = logging.getLogger("stream_cl")

RUN_SECTIONS = tuple(s for s in SECTIONS if s not in SERVICE_ONLY)
"""``run`` is ``serve`` without checkpoints, predictions and the drain bound."""

NO_RECORDS_EXIT_CODE = 4
"""Exit code when the source delivered no record at all (an empty file, a missing or empty topic)."""

INTERRUPTED_EXIT_CODE = 130
"""Exit code after Ctrl-C or SIGTERM (the partial summary is printed and written first)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="learn a stream once, then print a summary",
        description="Learn a stream test-then-train and print a summary. Settings come from flags, then STREAMCL_* "
        "environment variables (STREAMCL_BATCH_SIZE for --batch-size), then --config FILE, then defaults.",
    )
    add_settings(p, RUN_SECTIONS)
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    if args.print_config:
        print_config(cfg, RUN_SECTIONS)
        return 0
    from stream_cl.service import serve, stop_on_signals  # here: --help and --print-config need no torch

    stop = threading.Event()
    with stop_on_signals(stop, cfg.service.drain_timeout) as received:
        summary = serve(cfg, stop, require_topic=True)
    print(summary.render())
    if cfg.run.summary_json:
        summary.write(cfg.run.summary_json)
    if received:
        return INTERRUPTED_EXIT_CODE
    if summary.consumed == 0:
        log.warning("the source delivered no record: check the topic name or the file")
        return NO_RECORDS_EXIT_CODE
    return 0
