"""Settings on the command line: the config flags of a command, ``--config`` and ``--print-config``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from stream_cl.config import Config, add_arguments, flat_fields, load, masked


def add_settings(parser: argparse.ArgumentParser, sections: Sequence[str], *, printable: bool = True) -> None:
    """``--config``, ``--print-config`` (if ``printable``) and one flag per setting of ``sections``."""
    parser.add_argument(
        "--config", default=None, help="settings file (.yaml/.yml or .toml; flat names or sections); or STREAMCL_CONFIG"
    )
    if printable:
        parser.add_argument("--print-config", action="store_true", help="print the effective settings, secrets masked")
    add_arguments(parser, sections)
    parser.set_defaults(setting_sections=tuple(sections))


def config_from(args: argparse.Namespace) -> Config:
    """The config of a parsed command line: defaults < file < ``STREAMCL_*`` < the flags given."""
    names = setting_names(args.setting_sections)
    given = {k: v for k, v in vars(args).items() if k in names}
    return load(given, dict(os.environ), sections=args.setting_sections, config_file=args.config)


def setting_names(sections: Sequence[str]) -> set[str]:
    """Flat names of the settings in ``sections``."""
    return {flat for flat, (section, _) in flat_fields().items() if section in sections}


def print_config(cfg: Config, sections: Sequence[str]) -> None:
    """The effective settings of ``sections``, secrets masked, as YAML."""
    names = setting_names(sections)
    values = {k: _plain(v) for k, v in cfg.flat().items() if k in names}
    sys.stdout.write(yaml.safe_dump(masked(values), sort_keys=True))


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
