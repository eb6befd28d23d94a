"""Service configuration: a file (YAML or TOML), ``STREAMCL_*`` environment variables and flags.

Every setting has one flat name, the destination of its command-line flag (``--checkpoint-dir``
→ ``checkpoint_dir``). The environment spells it ``STREAMCL_CHECKPOINT_DIR``; a file either
spells it flat (``checkpoint_dir: ...``) or groups it by its first word (``checkpoint: {dir:
...}``). Flags override the environment, which overrides the file, which overrides defaults.
Unknown names and conflicting settings fail at load time with :class:`ConfigError`; the merged
result is split into the frozen section dataclasses the service uses.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from stream_cl.errors import ConfigError

ENV_PREFIX = "STREAMCL_"
MASK = "***"
_SECRET = re.compile(r"password|secret|token", re.IGNORECASE)


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka client security, passed through to kafka-python (``security_protocol`` etc.)."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000

    def __post_init__(self) -> None:
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise ConfigError(f"kafka_security_protocol must be one of {', '.join(protocols)}")
        sasl = self.security_protocol.startswith("SASL_")
        if sasl != (self.sasl_mechanism is not None):
            raise ConfigError("kafka_sasl_mechanism is required with, and only with, a SASL_* security protocol")
        if (self.sasl_username is None) != (self.sasl_password is None):
            raise ConfigError("kafka_sasl_username and kafka_sasl_password go together")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's consumer and producer."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        names = {"sasl_username": "sasl_plain_username", "sasl_password": "sasl_plain_password"}
        for f in fields(self)[1:-2]:
            value = getattr(self, f.name)
            if value is not None:
                out[names.get(f.name, f.name)] = value
        return out


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often checkpoints are written (``dir`` None: no checkpoints)."""

    dir: str | None = None
    every_records: int | None = None
    every_seconds: float | None = 60.0
    keep: int = 3

    def __post_init__(self) -> None:
        if self.dir is None and self.every_records is not None:
            raise ConfigError("checkpoint_every_records needs checkpoint_dir")
        if self.keep < 1:
            raise ConfigError(f"checkpoint_keep must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class PredictionsConfig:
    """Predictions output (``kafka://HOST:PORT/TOPIC`` or a JSON-lines file) and which records."""

    url: str | None = None
    which: str = "unlabelled"


@dataclass(frozen=True)
class OverloadConfig:
    """Falling-behind policy: ``queue``, ``subsample`` or ``predict-only`` above ``max_lag``."""

    policy: str = "queue"
    max_lag: int | None = None
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.policy != "queue" and self.max_lag is None:
            raise ConfigError(f"overload_policy {self.policy!r} needs max_lag")


@dataclass(frozen=True)
class ServiceConfig:
    """The effective configuration of ``stream-cl serve``: run options plus the service sections."""

    run: Mapping[str, Any]
    kafka: KafkaConfig
    checkpoint: CheckpointConfig
    predictions: PredictionsConfig
    overload: OverloadConfig
    drain_timeout: float

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServiceConfig:
        """Split flat settings (flag destinations) into sections; the rest are run options."""
        rest = dict(values)

        def take(prefix: str, section: type, rename: Mapping[str, str] | None = None) -> Any:
            names = {f.name: (rename or {}).get(f.name, prefix + f.name) for f in fields(section)}
            return section(**{name: rest.pop(flat) for name, flat in names.items() if flat in rest})

        kafka = take("kafka_", KafkaConfig)
        checkpoint = take("checkpoint_", CheckpointConfig)
        predictions = take("predictions_", PredictionsConfig, {"url": "predictions", "which": "predictions_for"})
        overload = take("", OverloadConfig, {"policy": "overload_policy", "fraction": "subsample_fraction"})
        drain = float(rest.pop("drain_timeout", 30.0))
        if drain <= 0:
            raise ConfigError(f"drain_timeout must be > 0, got {drain}")
        return cls(rest, kafka, checkpoint, predictions, overload, drain)


def read_file(path: str | Path) -> dict[str, Any]:
    """Flat settings from a YAML or TOML file (TOML by the ``.toml`` suffix); sections are flattened."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({_name(f"{key}_{k}"): v for k, v in value.items()})
        else:
            flat[_name(key)] = value
    return flat


def read_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings from ``STREAMCL_*`` variables (``STREAMCL_CHECKPOINT_DIR`` → ``checkpoint_dir``)."""
    skip = {"STREAMCL_TEST_THREADS"}  # a test-suite knob, not a service setting
    return {
        k.removeprefix(ENV_PREFIX).lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k not in skip
    }


def merge(known: Iterable[str], *layers: tuple[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Later layers override earlier ones; a name not in ``known`` fails, naming its origin."""
    known = set(known)
    out: dict[str, Any] = {}
    for origin, layer in layers:
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {origin}: {', '.join(unknown)}")
        out.update(layer)
    return out


def masked(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with secrets hidden: passwords, tokens, and credentials inside URLs."""
    out = {}
    for key, value in values.items():
        if value is not None and _SECRET.search(key):
            out[key] = MASK
        elif isinstance(value, str) and "@" in value and "://" in value:
            out[key] = _mask_url(value)
        else:
            out[key] = value
    return out


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}{MASK}@{parts.netloc.rpartition('@')[2]}"))


def _name(key: str) -> str:
    return str(key).replace("-", "_").lower()
