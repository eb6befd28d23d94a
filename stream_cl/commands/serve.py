"""``stream-cl serve``: the long-running service (``run`` plus checkpoints, health, predictions)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any

import yaml

from stream_cl.commands.run import _positive, add_run_arguments
from stream_cl.config import ServiceConfig, masked, merge, read_env, read_file
from stream_cl.errors import ConfigError
from stream_cl.overload import POLICIES
from stream_cl.predictions import WHICH
from stream_cl.service import serve, stop_on_signals

log = logging.getLogger("stream_cl.serve")

_NOT_SETTINGS = {"help", "config", "print_config", "handler", "command", "verbose"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run as a service: checkpoints, graceful drain, health, predictions",
        description="Learn a stream as a long-running service. Every `run` option works here. Settings come "
        "from flags, then STREAMCL_* environment variables (STREAMCL_CHECKPOINT_DIR for --checkpoint-dir), then "
        "--config FILE (YAML or TOML; flat names or sections such as `checkpoint: {dir: ...}`).",
    )
    add_run_arguments(p)
    add_service_arguments(p)
    # Flags must override the environment and the file only when given, so the parser keeps no
    # defaults; they become the bottom layer of the merge instead.
    actions = {a.dest: a for a in p._actions if a.dest not in _NOT_SETTINGS}
    defaults = {dest: a.default for dest, a in actions.items()}
    for action in actions.values():
        action.default = argparse.SUPPRESS
    p.set_defaults(handler=cmd_serve, setting_actions=actions, setting_defaults=defaults)


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="settings file (.yaml/.yml or .toml); or STREAMCL_CONFIG")
    p.add_argument("--print-config", action="store_true", help="print the effective settings (secrets masked), exit")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint directory (none: no checkpoints)")
    p.add_argument("--checkpoint-every-records", type=_positive(int), default=None, help="checkpoint cadence")
    p.add_argument(
        "--checkpoint-every-seconds", type=_positive(float), default=60.0, help="checkpoint cadence (default: 60)"
    )
    p.add_argument("--checkpoint-keep", type=_positive(int), default=3, help="checkpoints kept (default: 3)")
    p.add_argument(
        "--drain-timeout", type=_positive(float), default=30.0, help="seconds a SIGTERM drain may take (default: 30)"
    )
    p.add_argument("--predictions", default=None, help="prediction output: kafka://HOST:PORT/TOPIC or a .jsonl file")
    p.add_argument("--predictions-for", choices=WHICH, default="unlabelled", help="which records get a prediction")
    p.add_argument("--overload-policy", choices=POLICIES, default="queue", help="what to do above --max-lag")
    p.add_argument("--max-lag", type=int, default=None, help="consumer lag (records) that counts as falling behind")
    p.add_argument(
        "--subsample-fraction", type=float, default=0.5, help="share learned under --overload-policy subsample"
    )
    p.add_argument("--kafka-security-protocol", default="PLAINTEXT", help="PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL")
    p.add_argument("--kafka-sasl-mechanism", default=None, help="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ...")
    p.add_argument("--kafka-sasl-username", default=None)
    p.add_argument("--kafka-sasl-password", default=None, help="prefer STREAMCL_KAFKA_SASL_PASSWORD")
    p.add_argument("--kafka-ssl-cafile", default=None)
    p.add_argument("--kafka-ssl-certfile", default=None)
    p.add_argument("--kafka-ssl-keyfile", default=None)
    p.add_argument("--kafka-session-timeout-ms", type=_positive(int), default=10000, help="group session timeout")
    p.add_argument("--kafka-heartbeat-interval-ms", type=_positive(int), default=3000, help="group heartbeat")


def load_config(args: argparse.Namespace, environ: dict[str, str]) -> tuple[ServiceConfig, dict[str, Any]]:
    """Merge defaults < file < environment < flags; returns the config and the flat effective settings."""
    actions = args.setting_actions
    given = {k: v for k, v in vars(args).items() if k in actions}
    env = read_env(environ)
    path = args.config or env.pop("config", None)
    file_layer = {} if path is None else read_file(path)
    flat = merge(
        actions,
        ("defaults", args.setting_defaults),
        (f"config file {path}", _coerce(actions, file_layer, "config file")),
        ("environment", _coerce(actions, env, "environment")),
        ("flags", given),
    )
    return ServiceConfig.from_mapping(flat), flat


def _coerce(actions: dict[str, argparse.Action], layer: dict[str, Any], origin: str) -> dict[str, Any]:
    """Values from a file or the environment converted and checked like the flag itself."""
    out = {}
    for key, value in layer.items():
        action = actions.get(key)
        if action is None or value is None:
            out[key] = value  # unknown names are reported by merge
            continue
        try:
            if action.nargs == 0:  # store_true
                out[key] = value if isinstance(value, bool) else _boolean(str(value))
            elif isinstance(action, argparse._AppendAction):  # a list in a file, comma-separated in the environment
                items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
                out[key] = [action.type(str(v)) if action.type else v for v in items]
            else:
                out[key] = action.type(str(value)) if action.type else value
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{key} in {origin}: {err}") from err
        if action.choices is not None and out[key] not in action.choices:
            raise ConfigError(f"{key} in {origin}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def cmd_serve(args: argparse.Namespace) -> int:
    cfg, flat = load_config(args, dict(os.environ))
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(masked({k: _plain(v) for k, v in flat.items()}), sort_keys=True))
        return 0
    stop = threading.Event()
    with stop_on_signals(stop, cfg.drain_timeout):
        summary = serve(cfg, stop)
    print(summary.render())
    if cfg.run["summary_json"]:
        summary.write(cfg.run["summary_json"])
    log.info(
        "stopped: learned %d (%d in the model's history), predicted %d, dead letters %d",
        summary.learned,
        summary.learned_total,
        summary.predicted,
        sum(summary.dead_letter.values()),
    )
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
