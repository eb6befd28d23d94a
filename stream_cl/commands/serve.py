"""``stream-cl serve``: the long-running service (``run`` plus checkpoints, health, predictions)."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import TYPE_CHECKING

from stream_cl import __version__
from stream_cl.commands.settings import add_settings, config_from, print_config, setting_names
from stream_cl.config import SECTIONS, Config, masked
from stream_cl.errors import ConfigError

if TYPE_CHECKING:
    from stream_cl.summary import Summary

log = logging.getLogger("stream_cl.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run as a service: checkpoints, graceful drain, health, predictions",
        description="Learn a stream as a long-running service. Every `run` option works here. Settings come "
        "from flags, then STREAMCL_* environment variables (STREAMCL_CHECKPOINT_DIR for --checkpoint-dir), then "
        "--config FILE (YAML or TOML; flat names or sections such as `checkpoint: {dir: ...}`), then defaults.",
    )
    add_settings(p, tuple(SECTIONS))
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    if args.print_config:
        print_config(cfg, tuple(SECTIONS))
        return 0
    from stream_cl.commands.run import NO_RECORDS_EXIT_CODE
    from stream_cl.scaleout import launched_by_torchrun
    from stream_cl.service import serve, stop_on_signals  # here: --help and --print-config need no torch

    names = setting_names(tuple(SECTIONS))
    effective = masked({k: v for k, v in cfg.flat().items() if k in names and k in cfg.explicit})
    log.info("stream-cl %s serving with %s", __version__, effective or "defaults")
    if cfg.checkpoint.dir is None:
        log.warning("no --checkpoint-dir: the model is lost when the service stops")
    if cfg.service.workers > 1 or launched_by_torchrun():
        summary, received = _scale_out(cfg, args)
        if summary is None:
            return 0  # a worker other than rank 0 under torchrun: rank 0 reports for the group
    else:
        stop = threading.Event()
        with stop_on_signals(stop, cfg.service.drain_timeout) as received:
            summary = serve(cfg, stop)
    print(summary.render())
    if cfg.run.summary_json:
        summary.write(cfg.run.summary_json)
    log.info(
        "stopped: consumed %d, learned %d (%d in the model's history), predicted %d, dead letters %d",
        summary.consumed,
        summary.learned,
        summary.learned_total,
        summary.predicted,
        summary.count("dead_letter"),
    )
    if not received and summary.consumed_total == 0:  # it ended by itself, never having seen a record
        log.warning("the source delivered no record: check the topic name or the file")
        return NO_RECORDS_EXIT_CODE
    if not received and summary.never_assigned:  # a model with a history, but this run could learn nothing
        log.warning("the consumer group never assigned this service a partition: check the group's other members")
        return NO_RECORDS_EXIT_CODE
    return 0


def _scale_out(cfg: Config, args: argparse.Namespace) -> tuple[Summary | None, bool]:
    """Run as a group of workers: launch ``--workers`` local ones, or be one that ``torchrun`` started."""
    from stream_cl.scaleout import launch, launched_by_torchrun, run_worker

    if not launched_by_torchrun():
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())  # -v included
        return launch(cfg, level, args.log_format)
    if cfg.service.workers > 1:
        raise ConfigError("--workers starts local workers; under torchrun, give it --nproc-per-node instead")
    summary, received = run_worker(cfg, torchrun=os.getppid())
    return (summary if int(os.environ["RANK"]) == 0 else None), received
