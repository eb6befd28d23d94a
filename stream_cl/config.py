"""The run configuration: one frozen, typed :class:`Config` for ``run``, ``serve`` and the benchmarks.

Every setting is a field of a section dataclass and has one flat name, the destination of its
command-line flag (``--checkpoint-dir`` → ``checkpoint_dir``). The environment spells it
``STREAMCL_CHECKPOINT_DIR``; a file (YAML or TOML) either spells it flat (``checkpoint_dir: ...``)
or groups it by section (``checkpoint: {dir: ...}``, ``learner: {seed: 1}``). :func:`load` merges defaults < file <
environment < flags and coerces every value by its field's type, so a value means the same
whichever layer gave it. Unknown names in a file and bad values fail at load time with
:class:`ConfigError`, naming the layer; unknown ``STREAMCL_*`` variables are only warned about
(orchestrators inject variables of their own into that namespace). A string setting takes only a
string (a file's ``off`` or list is an error, not ``'False'``); an empty string unsets an optional
setting and is an error for a required one (``drift`` excepted: no detectors). Numbers must be
finite, durations at most :data:`MAX_SECONDS`.

This module imports neither torch nor the methods until a config names a device or a method to
check: ``stream-cl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import threading
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from consumers.urls import MASK, SECRET, mask_url
from monitoring.drift import DEFAULT_DRIFT
from stream_cl.errors import ConfigError

log = logging.getLogger("stream_cl.config")

ENV_PREFIX = "STREAMCL_"
DEFAULT_METRICS_PORT = 9108
_NOT_ENV = {"STREAMCL_TEST_THREADS"}  # a test-suite knob, not a setting


class Choices:
    """Allowed values computed on first use, so naming the methods or models imports nothing early."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._load()))

    def __contains__(self, value: object) -> bool:
        return value in set(self._load())


def _methods() -> Iterable[str]:
    from stream_cl.methods import METHODS

    return METHODS


def _models() -> Iterable[str]:
    from stream_cl.models import MODELS

    return MODELS


def _kafka_clients() -> Iterable[str]:
    from consumers.open import KAFKA_CLIENTS

    return KAFKA_CLIENTS


def _buffer_policies() -> Iterable[str]:
    from buffers.open import POLICIES

    return POLICIES


def setting(
    default: Any,
    help: str,
    *,
    flat: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    choices: Iterable[str] | Choices | None = None,
    metavar: str | None = None,
    empty_ok: bool = False,
) -> Any:
    """A config field: ``flat`` overrides the section's flat name, ``check`` returns a complaint or None,
    ``empty_ok`` lets a required string setting be empty (it means "none" there, not "unset")."""
    meta = {"help": help, "flat": flat, "check": check, "choices": choices, "metavar": metavar, "empty_ok": empty_ok}
    if isinstance(default, list | dict):
        raise TypeError("use a tuple for a sequence default")
    return field(default=default, metadata=meta)


def positive(value: float | None) -> str | None:
    return None if value is None or value > 0 else f"must be > 0, got {value}"


def non_negative(value: float | None) -> str | None:
    return None if value is None or value >= 0 else f"must be >= 0, got {value}"


def fraction(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f"must be in [0, 1), got {value}"


def share(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else f"must be in (0, 1], got {value}"


MAX_SECONDS = min(10 * 365 * 86400, threading.TIMEOUT_MAX)
"""Longest duration setting: ten years (less where the platform's thread timeout is shorter), since a drain
timeout above ``threading.TIMEOUT_MAX`` makes the drain's watchdog raise instead of waiting."""


def duration(value: float | None) -> str | None:
    if value is None or 0 < value <= MAX_SECONDS:
        return None
    return f"must be > 0 and at most {MAX_SECONDS:.0f} seconds, got {value}"


MAX_BUFFER_SIZE = 100_000_000
"""Most replay samples: the memory buffer allocates every slot when the first record arrives (long after a
service reported ready), so a mistyped size fails at start rather than as an allocation error then."""


def buffer_size(value: int) -> str | None:
    return None if 0 < value <= MAX_BUFFER_SIZE else f"must be > 0 and at most {MAX_BUFFER_SIZE:,}, got {value}"


def finite_hparams(pairs: tuple[tuple[str, Any], ...]) -> str | None:
    """No hyper-parameter takes NaN or an infinity; the methods check ranges when the learner is built."""
    bad = [f"{key}={value}" for key, value in pairs if isinstance(value, float) and not math.isfinite(value)]
    return f"must be finite numbers, got {', '.join(bad)}" if bad else None


def parse_hparam(text: str) -> tuple[str, bool | int | float | str | None]:
    """``KEY=VALUE`` → (key, value); the value becomes a bool, None, int or float where it reads as one.

    >>> parse_hparam("rotations=4"), parse_hparam("amp=false"), parse_hparam("name=x")
    (('rotations', 4), ('amp', False), ('name', 'x'))
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    low = value.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    if low in ("none", "null"):
        return key.strip(), None
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    return key.strip(), value


@dataclass(frozen=True)
class LearnerConfig:
    """What learns: method, backbone, seed and device."""

    method: str = setting("er", "learning method", choices=Choices(_methods))
    model: str = setting("mlp", "backbone", choices=Choices(_models))
    width: int | None = setting(None, "MLP hidden size or ResNet nf override", check=positive)
    hparam: tuple[tuple[str, Any], ...] = setting(
        (),
        "method hyper-parameter KEY=VALUE, repeatable (e.g. --hparam rotations=4)",
        check=finite_hparams,
        metavar="KEY=VALUE",
    )
    seed: int = setting(0, "random seed", check=non_negative)
    device: str = setting("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    max_classes: int = setting(
        1000, "most classes (all levels) a stream may bring; more are dead letters", check=positive
    )
    max_parameters: int = setting(
        100_000_000,
        "most backbone parameters an input may need; records of larger inputs are dead letters",
        check=positive,
    )

    def __post_init__(self) -> None:
        kind = self.device.split(":", 1)[0]
        if kind not in ("auto", "cpu", "cuda", "mps"):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if kind != "auto":
            import torch  # here, not at the top: a config with the default device does not load torch

            try:
                torch.device(self.device)
            except RuntimeError:  # "cpu:x", "cuda:abc", "cuda:-1"
                raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}") from None


@dataclass(frozen=True)
class BufferConfig:
    """The replay buffer: where it lives, which samples stay, how many."""

    spec: str = setting(
        "memory",
        "replay buffer: 'memory' or a shared Redis buffer 'redis[s]://[user:pass@]host:port/db?name=NAME'",
        flat="buffer",
    )
    policy: str = setting(
        "reservoir",
        "which samples the buffer keeps (Redis runs reservoir or class-balanced)",
        flat="buffer_policy",
        choices=Choices(_buffer_policies),
    )
    size: int = setting(
        500, f"replay buffer capacity (at most {MAX_BUFFER_SIZE:,})", flat="buffer_size", check=buffer_size
    )


@dataclass(frozen=True)
class SourceConfig:
    """Where records come from and where the ones that cannot be learned go."""

    url: str | None = setting(
        None,
        "kafka://HOST:PORT/TOPIC, a recorded-stream file or synthetic://?... (default: the shipped stream)",
        flat="source",
    )
    group: str = setting("stream-cl", "Kafka consumer group")
    until_idle: float | None = setting(
        None,
        "stop once no record arrived for this long, counted from the first partition assignment, and none waits "
        "unread on the consumer's partitions (default: a Kafka source runs until stopped)",
        check=duration,
        metavar="SECONDS",
    )
    prefetch: int = setting(
        0,
        "read and decode a file source this many batches ahead on a background thread (0: off; a Kafka source "
        "always fetches ahead)",
        check=non_negative,
        metavar="BATCHES",
    )
    dead_letter_out: str | None = setting(None, "also write dead letters to this recorded-stream file")
    dead_letter_topic: str | None = setting(None, "Kafka dead-letter topic (default: TOPIC.dlq)")
    dead_letter_spool: str | None = setting(
        None,
        "directory where Kafka dead letters wait while the broker is unreachable (default: CHECKPOINT_DIR/"
        "dead-letter-spool with checkpoints, else a temporary directory, which a restart does not see)",
    )


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka client security and group timing, passed through to kafka-python, and which client consumes."""

    security_protocol: str = setting(
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    sasl_mechanism: str | None = setting(None, "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ...")
    sasl_username: str | None = setting(None, "SASL user")
    sasl_password: str | None = setting(None, "SASL password (prefer STREAMCL_KAFKA_SASL_PASSWORD)")
    ssl_cafile: str | None = setting(None, "CA bundle for SSL")
    ssl_certfile: str | None = setting(None, "client certificate for SSL")
    ssl_keyfile: str | None = setting(None, "client key for SSL")
    session_timeout_ms: int = setting(10000, "consumer group session timeout", check=positive)
    heartbeat_interval_ms: int | None = setting(
        None, "consumer group heartbeat (default: a quarter of the session timeout)", check=positive
    )
    client: str = setting(
        "kafka-python",
        "client that consumes the source (librdkafka: confluent-kafka, pip install 'stream-cl[librdkafka]')",
        choices=Choices(_kafka_clients),
    )

    def __post_init__(self) -> None:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl != (self.sasl_mechanism is not None):
            raise ConfigError("kafka_sasl_mechanism is required with, and only with, a SASL_* security protocol")
        if (self.sasl_username is None) != (self.sasl_password is None):
            raise ConfigError("kafka_sasl_username and kafka_sasl_password go together")

    def client_options(self) -> dict[str, Any]:
        """Security keyword arguments for kafka-python's consumer, producer and admin clients."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        names = {"sasl_username": "sasl_plain_username", "sasl_password": "sasl_plain_password"}
        for f in fields(self)[1:-3]:
            value = getattr(self, f.name)
            if value is not None:
                out[names.get(f.name, f.name)] = value
        return out

    def consumer_options(self) -> dict[str, Any]:
        """:meth:`client_options` plus the group timing a consumer takes."""
        heartbeat = self.heartbeat_interval_ms or max(1, self.session_timeout_ms // 4)
        return {
            **self.client_options(),
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": heartbeat,
        }


@dataclass(frozen=True)
class MetricsConfig:
    """``/metrics`` and what it carries: drift detectors and per-class series."""

    port: int = setting(
        DEFAULT_METRICS_PORT,
        "serve /metrics on this port (0: off); when the default port is busy, a free one is taken",
        flat="metrics_port",
        check=non_negative,
    )
    addr: str = setting("127.0.0.1", "bind address of /metrics", flat="metrics_addr")
    drift: str = setting(
        DEFAULT_DRIFT,
        "drift detectors as detector:signal[:name=value...], comma-separated; detectors adwin, page-hinkley, "
        "kswin; signals error, loss, uncertainty",
        empty_ok=True,  # no detectors, as --no-drift
    )
    no_drift: bool = setting(False, "run no drift detectors")
    max_class_series: int = setting(
        100, "most per-class metric series (class accuracy, forgetting, buffer count) exported", check=positive
    )
    stall_seconds: float = setting(
        120.0,
        "seconds the learning loop may go without turning before /healthz and /readyz answer 503 (allow for the "
        "slowest step: a first model build on a cold GPU, a large batch, a checkpoint snapshot)",
        check=duration,
    )


@dataclass(frozen=True)
class RunConfig:
    """How the loop batches, measures and stops."""

    batch_size: int = setting(10, "stream micro-batch size", check=positive)
    max_records: int | None = setting(None, "stop after this many records", check=positive)
    probe_fraction: float = setting(
        0.05, "share of labelled records held out to measure accuracy and forgetting", check=fraction
    )
    probe_every: int = setting(500, "learned records between probe evaluations", check=positive)
    summary_json: str | None = setting(None, "write the final summary to this JSON file")
    no_progress: bool = setting(False, "hide the progress bar")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often checkpoints are written (``dir`` None: no checkpoints)."""

    dir: str | None = setting(None, "checkpoint directory (none: no checkpoints)")
    every_records: int | None = setting(None, "checkpoint every this many records", check=positive)
    every_seconds: float | None = setting(60.0, "checkpoint every this many seconds", check=duration)
    keep: int = setting(3, "checkpoints kept", check=positive)

    def __post_init__(self) -> None:
        if self.dir is None and self.every_records is not None:
            raise ConfigError("checkpoint_every_records needs checkpoint_dir")


@dataclass(frozen=True)
class PredictionsConfig:
    """Predictions output (``kafka://HOST:PORT/TOPIC`` or a JSON-lines file) and which records get one."""

    url: str | None = setting(None, "prediction output: kafka://HOST:PORT/TOPIC or a .jsonl file", flat="predictions")
    which: str = setting(
        "unlabelled", "which records get a prediction", flat="predictions_for", choices=("unlabelled", "all")
    )


@dataclass(frozen=True)
class OverloadConfig:
    """Falling-behind policy: ``queue``, ``subsample`` or ``predict-only`` above ``max_lag``."""

    policy: str = setting(
        "queue", "what to do above --max-lag", flat="overload_policy", choices=("queue", "subsample", "predict-only")
    )
    max_lag: int | None = setting(None, "consumer lag (records) that counts as falling behind", check=non_negative)
    resume_lag: int | None = setting(
        None, "lag at or below which the policy stops again (default: half of --max-lag)", check=non_negative
    )
    fraction: float = setting(
        0.5, "share learned under --overload-policy subsample", flat="subsample_fraction", check=share
    )

    def __post_init__(self) -> None:
        if self.policy != "queue" and self.max_lag is None:
            raise ConfigError(f"overload_policy {self.policy!r} needs max_lag")
        if self.resume_lag is not None and (self.max_lag is None or self.resume_lag > self.max_lag):
            raise ConfigError("resume_lag needs max_lag and must not exceed it")


@dataclass(frozen=True)
class ServiceConfig:
    """What only a long-running service needs besides checkpoints."""

    drain_timeout: float = setting(30.0, "seconds a SIGTERM drain may take", flat="drain_timeout", check=duration)
    workers: int = setting(
        1,
        "local workers learning one model together (torch's elastic launcher)",
        flat="workers",
        check=positive,
    )
    max_restarts: int = setting(
        3,
        "times the launcher restarts the workers after one fails",
        flat="max_restarts",
        check=non_negative,
    )
    sync: str = setting(
        "allreduce",
        "how workers keep one model: all-reduce gradients every step, or average parameters every K steps",
        flat="sync",
        choices=("allreduce", "average"),
    )
    average_every: int = setting(
        10, "group steps between parameter averages (--sync average)", flat="average_every", check=positive
    )
    collective_timeout: float = setting(
        600.0,
        "seconds a worker waits for the others in a group step before the group fails and is restarted (a hung worker)",
        flat="collective_timeout",
        check=duration,
    )


def _pending_spec(value: str) -> str | None:
    if value == "memory" or value.startswith(("redis://", "rediss://")):
        return None
    return f"must be 'memory' or a Redis URL redis[s]://HOST:PORT/DB, got {mask_url(value)!r}"


@dataclass(frozen=True)
class LabelsConfig:
    """Delayed labels: features predicted on arrival, learned when their label arrives on a topic of its own."""

    url: str | None = setting(
        None,
        "kafka://HOST:PORT/TOPIC of label messages {id, y} joining the source's records by id (none: labels come "
        "with the records)",
        flat="labels",
    )
    ttl_seconds: float = setting(
        86400.0,
        "longest event-time gap between a sample and its label, either order",
        flat="label_ttl_seconds",
        check=duration,
    )
    pending_max: int = setting(
        100_000,
        "most samples waiting for a label (and most labels waiting for a sample); the oldest leaves first",
        flat="pending_max",
        check=positive,
    )
    pending_max_mib: int = setting(
        1024,
        "most bytes the samples waiting hold (and the labels waiting), in MiB: in memory their arrays and messages, "
        "in Redis their entries; the oldest leaves first",
        flat="pending_max_mib",
        check=positive,
        metavar="MIB",
    )
    pending: str = setting(
        "memory",
        "where samples and labels wait: 'memory' (kept by checkpoints) or 'redis[s]://[user:pass@]HOST:PORT/DB' "
        "(survives restarts; keys under streamcl:pending:{GROUP}:)",
        flat="pending",
        check=_pending_spec,
    )


SECTIONS: dict[str, tuple[type, str]] = {
    "learner": (LearnerConfig, ""),
    "buffer": (BufferConfig, "buffer_"),
    "source": (SourceConfig, ""),
    "kafka": (KafkaConfig, "kafka_"),
    "metrics": (MetricsConfig, ""),
    "run": (RunConfig, ""),
    "checkpoint": (CheckpointConfig, "checkpoint_"),
    "predictions": (PredictionsConfig, "predictions_"),
    "overload": (OverloadConfig, ""),
    "labels": (LabelsConfig, ""),
    "service": (ServiceConfig, ""),
}
"""Section name → (dataclass, prefix of its fields' flat names)."""

SERVICE_ONLY = ("checkpoint", "predictions", "service")
"""Sections ``run`` does not have: it is ``serve`` without checkpoints and predictions."""


@dataclass(frozen=True)
class Config:
    """The effective configuration of a run: one frozen section per concern.

    ``explicit`` holds the flat names some layer (file, environment, flag) set, so a default can
    behave as a default (the metrics port moves when busy; a port asked for does not).
    """

    learner: LearnerConfig = field(default_factory=LearnerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    predictions: PredictionsConfig = field(default_factory=PredictionsConfig)
    overload: OverloadConfig = field(default_factory=OverloadConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    explicit: frozenset[str] = frozenset()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], origin: str = "settings") -> Config:
        """A config from flat settings (typed or strings); unknown names fail."""
        table = flat_fields()
        unknown = sorted(set(values) - set(table))
        if unknown:
            raise ConfigError(f"unknown setting(s) in {origin}: {', '.join(unknown)}")
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for flat, value in values.items():
            section, f = table[flat]
            parts[section][f.name] = coerce(f, value, f"{flat} in {origin}")
        built = {name: SECTIONS[name][0](**kwargs) for name, kwargs in parts.items()}
        return cls(**built, explicit=frozenset(values))

    def flat(self) -> dict[str, Any]:
        """Every setting by flat name, as plain values (for ``--print-config``)."""
        out = {}
        for flat, (section, f) in flat_fields().items():
            value = getattr(getattr(self, section), f.name)
            out[flat] = [list(v) for v in value] if f.name == "hparam" else value
        return out

    def with_values(self, **flat: Any) -> Config:
        """A copy with some settings replaced (by flat name), checked like the rest."""
        table = flat_fields()
        sections: dict[str, Any] = {}
        for name, value in flat.items():
            section, f = table[name]
            current = sections.get(section, getattr(self, section))
            sections[section] = replace(current, **{f.name: coerce(f, value, name)})
        return replace(self, **sections, explicit=self.explicit | set(flat))


def flat_fields() -> dict[str, tuple[str, Field]]:
    """Flat name → (section, field) for every setting."""
    out = {}
    for section, (kind, prefix) in SECTIONS.items():
        for f in fields(kind):
            out[f.metadata["flat"] or prefix + f.name] = (section, f)
    return out


def coerce(f: Field, value: Any, where: str) -> Any:
    """``value`` (typed, or a string from a flag or the environment) as ``f``'s type, checked."""
    kind, optional = _kind(f)
    try:
        if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            if not optional:
                raise ValueError("must be set")
            return None
        if kind is bool:
            out = value if isinstance(value, bool) else _boolean(str(value))
        elif kind is tuple:  # KEY=VALUE pairs: a list or mapping in a file, comma-separated in the environment
            out = _pairs(value)
        elif kind in (int, float):
            if isinstance(value, bool) or (kind is int and isinstance(value, float)):
                raise ValueError(f"expected {kind.__name__}, got {value!r}")
            out = kind(value) if isinstance(value, int | float) else kind(str(value).strip())
            if kind is float and not math.isfinite(out):
                raise ValueError(f"must be a finite number, got {value!r}")
        else:
            out = _string(value, empty_ok=f.metadata["empty_ok"])
    except (ValueError, OverflowError) as err:  # OverflowError: a file's integer too large for a float
        raise ConfigError(f"{where}: {err}") from None
    choices = f.metadata["choices"]
    if choices is not None and out not in choices:
        raise ConfigError(f"{where}: {out!r} is not one of {', '.join(choices)}")
    check = f.metadata["check"]
    problem = check(out) if check is not None else None
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return out


def _kind(f: Field) -> tuple[type, bool]:
    """The field's base type and whether it may be None (annotations are strings here)."""
    hint = typing.get_type_hints(_owner(f))[f.name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    return (typing.get_origin(base) or base), optional


def _owner(f: Field) -> type:
    for kind, _ in SECTIONS.values():
        if any(g is f for g in fields(kind)):
            return kind
    raise KeyError(f.name)


def _pairs(value: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        return tuple((str(k), v) for k, v in value.items())
    items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v.strip()]
    out = []
    for item in items:
        if isinstance(item, list | tuple) and len(item) == 2:
            out.append((str(item[0]), item[1]))
        else:
            out.append(parse_hparam(str(item)))
    return tuple(out)


def _string(value: Any, *, empty_ok: bool) -> str:
    """A string setting takes only a string (or a path, from Python): ``str()`` would turn a file's ``off`` into a
    directory named ``False`` and a list into its repr. Empty means unset where the setting is optional (handled
    before this), and is refused where it is required unless ``empty_ok`` (an empty bind address would listen on
    every interface, an empty consumer group is no group)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
    if not value.strip() and not empty_ok:
        raise ValueError("must not be empty")
    return value


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_arguments(parser: argparse.ArgumentParser, sections: Iterable[str]) -> None:
    """One flag per setting of ``sections``, generated from the fields (help shows each default).

    Flags keep no default in the namespace (``SUPPRESS``): :func:`load` takes only the given ones,
    as the top layer, and coerces them like every other layer.
    """
    for section in sections:
        kind, prefix = SECTIONS[section]
        group = parser.add_argument_group(section, kind.__doc__.splitlines()[0])
        for f in fields(kind):
            flat = f.metadata["flat"] or prefix + f.name
            flag = "--" + flat.replace("_", "-")
            shown = f.default not in (None, (), False) and f.default is not MISSING
            default = f" (default: {f.default})" if shown else ""
            common = {"dest": flat, "default": argparse.SUPPRESS, "help": f.metadata["help"] + default}
            base, _ = _kind(f)
            if base is bool:
                group.add_argument(flag, action="store_true", **common)
            elif base is tuple:
                group.add_argument(flag, action="append", metavar=f.metadata["metavar"], **common)
            elif f.metadata["choices"] is not None:  # argparse lists them in --help only when asked
                group.add_argument(flag, choices=f.metadata["choices"], **common)
            else:
                group.add_argument(flag, metavar=f.metadata["metavar"] or flat.upper().split("_")[-1], **common)


def load(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    sections: Iterable[str] = tuple(SECTIONS),
    config_file: str | None = None,
) -> Config:
    """Merge defaults < file < ``STREAMCL_*`` environment < ``flags`` into a :class:`Config`.

    ``flags`` are the flat names given on the command line; ``sections`` are those the command
    has (a setting of another section in a file or the environment fails, or is warned about).
    """
    known = {flat for flat, (section, _) in flat_fields().items() if section in set(sections)}
    env = read_env(environ)
    path = config_file or env.pop("config", None)
    file_layer = {} if path is None else read_file(path)
    unknown_env = sorted(set(env) - known)
    if unknown_env:
        log.warning(
            "ignoring unknown setting(s) in the environment: %s",
            ", ".join(ENV_PREFIX + name.upper() for name in unknown_env),
        )
    merged: dict[str, Any] = {}
    for origin, layer in (
        (f"config file {path}", file_layer),
        ("environment", {k: v for k, v in env.items() if k in known}),
        ("flags", flags),
    ):
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {origin}: {', '.join(unknown)}")
        table = flat_fields()
        for name, value in layer.items():
            where = "--" + name.replace("_", "-") if origin == "flags" else f"{name} in {origin}"
            merged[name] = coerce(table[name][1], value, where)
    return Config.from_mapping(merged)


def read_file(path: str | Path) -> dict[str, Any]:
    """Flat settings from a YAML or TOML file (TOML by the ``.toml`` suffix); sections are flattened."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {_first_line(err)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    by_section = {(section, f.name): flat for flat, (section, f) in flat_fields().items()}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if (
            isinstance(value, dict) and _name(key) != "hparam"
        ):  # a section: `learner: {seed: 1}`, `checkpoint: {dir: x}`
            for k, v in value.items():
                flat[by_section.get((_name(key), _name(k)), _name(f"{key}_{k}"))] = v
        else:
            flat[_name(key)] = value
    return flat


def read_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings from ``STREAMCL_*`` variables (``STREAMCL_CHECKPOINT_DIR`` → ``checkpoint_dir``)."""
    return {
        k.removeprefix(ENV_PREFIX).lower(): v
        for k, v in environ.items()
        if k.startswith(ENV_PREFIX) and k not in _NOT_ENV
    }


def masked(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with secrets hidden: passwords, tokens, and credentials inside URLs."""
    out = {}
    for key, value in values.items():
        if value is not None and SECRET.search(key):
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = mask_url(value)
        else:
            out[key] = value
    return out


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _name(key: str) -> str:
    return str(key).replace("-", "_").lower()
