"""The pending stores of delayed labels: predicted samples waiting for their label, and labels waiting
for their sample, both keyed by id (:class:`PendingStore`), in process memory (:class:`MemoryPending`)
or in Redis (:class:`stream_cl.pending_redis.RedisPending`).

Both stores settle a whole batch per call with the same rules, so they join, expire and evict alike
(the same tests run against both). Time is event time: a pending sample expires once the label
topic's newest timestamp is more than the TTL past it, a waiting label once the feature topic's is; a
store holding more than ``max_pending`` entries of a kind gives up its oldest (the memory store also
while its entries of a kind hold more than ``max_bytes``: large messages must not take the process's
memory); a repeated id replaces the entry that waited (the older sample expires, the older label is
unmatched).

A clock is the newest timestamp of its topic no later than the wall clock plus ``max_clock_skew_s``
(by default a tenth of the TTL, at most a day, :func:`default_clock_skew`): a later one (a
producer's clock far ahead, a corrupt timestamp), NaN or infinity would otherwise expire everything that waits
and every later arrival, for good (the clocks are checkpointed). Such an entry, and one with no timestamp
(Kafka's -1 ms), still waits and joins; it expires as if stamped with its topic's clock when it came, the
other topic's before its own has one, the wall clock before either has (not with the bound: expiry goes
oldest entry first, so an entry stamped a day ahead would hold every later one back).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from consumers.label_wire import LabelRecord
from consumers.record import DeadLetter, Message, Position, Record, held_bytes, message_bytes
from consumers.wire import sample_message
from stream_cl.errors import StreamClError

UNMATCHED = "label_unmatched"
"""Dead-letter reason of a label that joined no sample (unknown id, already joined, expired, or evicted)."""

REPLACED = "a newer label for the same id arrived"
EVICTED = "evicted: too many labels waiting"

MAX_CLOCK_SKEW_S = 86_400.0
"""How far past the wall clock a timestamp may be and still move a store's event-time clock, at most by default."""


def default_clock_skew(ttl_s: float) -> float:
    """How far past the wall clock a timestamp may move a clock with this TTL unless set: a tenth of it, at most
    :data:`MAX_CLOCK_SKEW_S`.

    A clock moved ahead by that much takes as much off the time every waiting entry has left, so a tenth of the
    TTL bounds what one bad timestamp costs; producers' clocks differ by seconds, well within it.
    """
    return min(MAX_CLOCK_SKEW_S, ttl_s / 10)


def no_features(label_id: str) -> str:
    """Why a waiting label expired."""
    return f"no features for id {label_id!r:.80} within the TTL"


class PendingStateError(StreamClError):
    """A pending store cannot resume from the checkpoint: it was written with another store, or the Redis
    store lost its state or holds another run's."""


@dataclass(slots=True)
class Settled:
    """What one call settled, in the order it happened: joins (sample, its classes predicted on arrival,
    its label), samples given up (expired or evicted), and labels that joined nothing."""

    joined: list[tuple[Record, np.ndarray, LabelRecord]] = field(default_factory=list)
    expired: list[Record] = field(default_factory=list)
    unmatched: list[DeadLetter] = field(default_factory=list)


class PendingStore(Protocol):
    """Where samples and labels wait for each other.

    ``healthy`` is False while the store cannot be reached (calls then wait until it can);
    ``max_clock_skew_s`` is how far past the wall clock a timestamp is still believed;
    ``state_dict`` is what a checkpoint keeps of the store (taken at the batch boundary of the
    checkpoint's offsets) and ``restore`` brings the store back to it (None: to a run with no
    checkpoint); ``saved`` says that the checkpoint holding ``state`` is written.
    """

    healthy: bool
    max_clock_skew_s: float

    def arrive(self, records: list[Record], predicted: np.ndarray) -> Settled: ...

    def label(self, labels: list[LabelRecord]) -> Settled: ...

    def sizes(self) -> tuple[int, int]: ...

    def pending_ids(self) -> list[str]: ...

    def waiting_ids(self) -> list[str]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any] | None) -> None: ...

    def saved(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def wall_clock(max_clock_skew_s: float) -> tuple[float, float]:
    """The wall clock now, and the latest event time a clock may take now."""
    now = time.time()
    return now, now + max_clock_skew_s


def expires_from(timestamp: float, clock: float, other: float, now: float, limit: float) -> float:
    """The event time an entry's TTL counts from: its timestamp or, if that is not :func:`believable`, its
    topic's ``clock``; before that has one, the ``other`` topic's, which the TTL is measured against (the wall
    clock would hold every later expiry back in a replay of old records: expiry goes oldest entry first);
    ``now`` before either has one."""
    if believable(timestamp, limit):
        return timestamp
    return next((t for t in (clock, other) if t > float("-inf")), now)


def believable(timestamp: float, limit: float) -> bool:
    """Whether a timestamp may be an event time: not NaN, not before the epoch (Kafka's -1 ms means "none") and
    not past ``limit``."""
    return 0 <= timestamp <= limit


def advanced(clock: float, timestamps: Iterable[float], limit: float) -> float:
    """A topic's clock after ``timestamps``: the newest :func:`believable` one; the others leave it where it was."""
    return max(clock, max((t for t in timestamps if believable(t, limit)), default=clock))


def restored_clock(clock: float, limit: float) -> float:
    """A checkpointed clock, or none (-inf) if it is past ``limit`` (saved with a looser bound)."""
    return clock if believable(clock, limit) else float("-inf")


def check_clock_skew(max_clock_skew_s: float) -> None:
    if not (max_clock_skew_s > 0 and math.isfinite(max_clock_skew_s)):
        raise ValueError(f"max_clock_skew_s must be a finite number > 0, got {max_clock_skew_s}")


def pending_counts(state: dict[str, Any]) -> tuple[int, int]:
    """Samples and labels waiting in a checkpoint's pending state, whichever store wrote it."""
    if state.get("store") == "redis":
        return int(state["samples"]), int(state["labels"])
    return len(state["pending"]), len(state["waiting"])


@dataclass(slots=True)
class _Pending:
    record: Record
    predicted: np.ndarray
    at: float  # the event time its TTL counts from (see expires_from)
    shared: int | None  # what it shares with the other samples of its message (see _footprint), if any
    own: int  # the bytes it holds alone


def _footprint(record: Record) -> tuple[int | None, int, int]:
    """``(key, shared, own)``: the memory a waiting sample keeps alive. A sample of a message of several keeps
    the whole message, and for JSON the message's whole decoded array, alive (4,096 samples, up to 8 MiB):
    those ``shared`` bytes count once, while any sample of the message waits, under ``key``; cutting each
    sample out instead cost more than decoding the message. A message of one: ``(None, 0,
    held_bytes(record))``."""
    message = record.message
    if message.position.count == 1:
        return None, 0, held_bytes(record)
    shared, own = message_bytes(message), 0
    root = record.x
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.base is not message.value:  # not binary, whose array is a view on the message's bytes
        if root is not record.x:  # JSON: a view on the message's decoded array
            shared += root.nbytes
        else:
            own = record.x.nbytes
    if len(message.value) <= 1:  # a restored sample's own byte: CPython shares one-byte objects among messages
        return None, 0, shared + own
    return id(message.value), shared, own


@dataclass(slots=True)
class _Waiting:
    label: LabelRecord
    at: float


class MemoryPending:
    """Both stores as ordered dicts in this process; checkpoints carry their whole contents.

    ``max_bytes`` bounds the memory each store's entries hold (arrays and the raw messages kept for dead
    letters, :func:`_footprint`); None: only ``max_pending`` bounds them. ``max_clock_skew_s``: how far past the
    wall clock a timestamp may move the clocks (see the module docstring); None: :func:`default_clock_skew`.
    """

    healthy = True

    def __init__(
        self,
        *,
        ttl_s: float,
        max_pending: int,
        max_bytes: int | None = None,
        max_clock_skew_s: float | None = None,
    ) -> None:
        if ttl_s <= 0 or max_pending <= 0 or (max_bytes is not None and max_bytes <= 0):
            raise ValueError(f"ttl_s, max_pending and max_bytes must be > 0, got {ttl_s}, {max_pending}, {max_bytes}")
        if max_clock_skew_s is None:
            max_clock_skew_s = default_clock_skew(ttl_s)
        check_clock_skew(max_clock_skew_s)
        self.ttl_s, self.max_pending, self.max_bytes = ttl_s, max_pending, max_bytes
        self.max_clock_skew_s = max_clock_skew_s
        self.pending: OrderedDict[str, _Pending] = OrderedDict()
        self.waiting: OrderedDict[str, _Waiting] = OrderedDict()
        self.pending_bytes = self.waiting_bytes = 0
        self._messages: dict[int, list[int]] = {}  # shared key -> [samples waiting, shared bytes] (see _footprint)
        self.feature_time = self.label_time = float("-inf")  # newest event time seen on each topic

    def arrive(self, records: list[Record], predicted: np.ndarray) -> Settled:
        settled = Settled()
        now, limit = wall_clock(self.max_clock_skew_s)
        for record, classes in zip(records, predicted, strict=True):
            label = self._take_waiting(record.id)
            if label is not None:
                settled.joined.append((record, classes, label))
            else:
                old = self._take_pending(record.id)
                if old is not None:
                    settled.expired.append(old.record)
                at = expires_from(record.timestamp, self.feature_time, self.label_time, now, limit)
                self._add_pending(record, classes, at)
                while len(self.pending) > self.max_pending or self._over(self.pending_bytes):
                    settled.expired.append(self._take_oldest_pending().record)
            self.feature_time = advanced(self.feature_time, (record.timestamp,), limit)
            self._expire_labels(settled)
            self._expire_pending(settled)
        return settled

    def label(self, labels: list[LabelRecord]) -> Settled:
        settled = Settled()
        now, limit = wall_clock(self.max_clock_skew_s)
        for label in labels:
            found = self._take_pending(label.id)
            if found is not None:
                settled.joined.append((found.record, found.predicted, label))
            else:
                older = self._take_waiting(label.id)
                if older is not None:
                    settled.unmatched.append(DeadLetter(older.message, UNMATCHED, REPLACED))
                at = expires_from(label.timestamp, self.label_time, self.feature_time, now, limit)
                self.waiting[label.id] = _Waiting(label, at)
                self.waiting_bytes += held_bytes(label)
                while len(self.waiting) > self.max_pending or self._over(self.waiting_bytes):
                    evicted = self._take_oldest_waiting()
                    settled.unmatched.append(DeadLetter(evicted.message, UNMATCHED, EVICTED))
            self.label_time = advanced(self.label_time, (label.timestamp,), limit)
            self._expire_pending(settled)
        return settled

    def _over(self, held: int) -> bool:
        return self.max_bytes is not None and held > self.max_bytes

    def _add_pending(self, record: Record, predicted: np.ndarray, at: float) -> None:
        key, shared, own = _footprint(record)
        self.pending[record.id] = _Pending(record, predicted, at, key, own)
        self.pending_bytes += own
        if key is not None:
            message = self._messages.setdefault(key, [0, shared])
            if message[0] == 0:
                self.pending_bytes += shared
            message[0] += 1

    def _take_pending(self, sample_id: str) -> _Pending | None:
        found = self.pending.pop(sample_id, None)
        if found is not None:
            self._release(found)
        return found

    def _take_oldest_pending(self) -> _Pending:
        oldest = self.pending.popitem(last=False)[1]
        self._release(oldest)
        return oldest

    def _release(self, entry: _Pending) -> None:
        self.pending_bytes -= entry.own
        if entry.shared is not None:
            message = self._messages[entry.shared]
            message[0] -= 1
            if message[0] == 0:  # its last waiting sample: the message is no longer kept alive
                del self._messages[entry.shared]
                self.pending_bytes -= message[1]

    def _take_waiting(self, label_id: str) -> LabelRecord | None:
        found = self.waiting.pop(label_id, None)
        if found is None:
            return None
        self.waiting_bytes -= held_bytes(found.label)
        return found.label

    def _take_oldest_waiting(self) -> LabelRecord:
        oldest = self.waiting.popitem(last=False)[1].label
        self.waiting_bytes -= held_bytes(oldest)
        return oldest

    def sizes(self) -> tuple[int, int]:
        return len(self.pending), len(self.waiting)

    def pending_ids(self) -> list[str]:
        return list(self.pending)

    def waiting_ids(self) -> list[str]:
        return list(self.waiting)

    def state_dict(self) -> dict[str, Any]:
        """Both stores and event times, as tensors and plain containers (checkpoints load ``weights_only``)."""
        return {
            "feature_time": self.feature_time,
            "label_time": self.label_time,
            "pending": [_sample_state(p) for p in self.pending.values()],
            "waiting": [
                {"id": w.label.id, "label": list(w.label.label), "message": message_state(w.label.message)}
                for w in self.waiting.values()
            ],
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        self.pending.clear()
        self.waiting.clear()
        self._messages.clear()
        self.pending_bytes = self.waiting_bytes = 0
        self.feature_time = self.label_time = float("-inf")
        if state is None:
            return
        if state.get("store") == "redis":
            raise PendingStateError(
                "the checkpoint's pending samples are in Redis; resume with --pending and the Redis URL it was "
                "written with"
            )
        now, limit = wall_clock(self.max_clock_skew_s)
        self.feature_time = restored_clock(float(state["feature_time"]), limit)
        self.label_time = restored_clock(float(state["label_time"]), limit)
        for entry in state["pending"]:
            message = message_from_state(entry["message"])
            if "x" in entry:  # an array of its own; in older checkpoints, a binary sample's too (see _on_value)
                x = _on_value(entry["x"].numpy(), message.value)
            else:
                x = array_on_value(message.value, entry["dtype"], entry["shape"], entry["id"])
            record = Record(entry["id"], x, None, message.position, message.timestamp, message)
            at = expires_from(record.timestamp, self.feature_time, self.label_time, now, limit)
            self._add_pending(record, entry["predicted"].numpy(), at)
        for entry in state["waiting"]:
            message = message_from_state(entry["message"])
            label = LabelRecord(entry["id"], tuple(entry["label"]), message.position, message.timestamp, message)
            at = expires_from(label.timestamp, self.label_time, self.feature_time, now, limit)
            self.waiting[label.id] = _Waiting(label, at)
            self.waiting_bytes += held_bytes(label)

    def saved(self, state: dict[str, Any]) -> None:
        pass  # the checkpoint itself holds the stores

    def close(self) -> None:
        pass

    def _expire_pending(self, settled: Settled) -> None:
        while self.pending:
            oldest = next(iter(self.pending.values()))
            if oldest.at + self.ttl_s >= self.label_time:
                return
            settled.expired.append(self._take_oldest_pending().record)

    def _expire_labels(self, settled: Settled) -> None:
        while self.waiting:
            if next(iter(self.waiting.values())).at + self.ttl_s >= self.feature_time:
                return
            oldest = self._take_oldest_waiting()
            settled.unmatched.append(DeadLetter(oldest.message, UNMATCHED, no_features(oldest.id)))


def _sample_state(entry: _Pending) -> dict[str, Any]:
    """A waiting sample as checkpoint data. Of a message of several it keeps only its own part (not the whole
    message once per sample); an array that is that part's bytes (binary) only as its layout: those bytes once."""
    record = entry.record
    message = sample_message(record.message)
    state = {"id": record.id, "predicted": torch.from_numpy(entry.predicted.copy()), "message": message_state(message)}
    if is_value_bytes(record.x, message.value):
        state |= {"dtype": record.x.dtype.str, "shape": list(record.x.shape)}
    else:
        state["x"] = torch.from_numpy(record.x.copy())
    return state


def is_value_bytes(x: np.ndarray, value: bytes) -> bool:
    """Whether an array's bytes are exactly ``value``. A contiguous view of its whole length on it holds them, known
    without reading them (a binary sample of a message of one, as decoded or restored); others are compared (a binary
    sample's part, cut from its message of several)."""
    if x.nbytes != len(value) or not x.flags.c_contiguous:
        return False
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root.base is value or x.tobytes() == value


def message_state(message: Message) -> dict[str, Any]:
    """A message as checkpoint data: its bytes kept exactly, so a later dead letter still carries them."""
    p = message.position
    return {
        "position": [p.stream, p.partition, p.offset, p.index, p.count],
        "timestamp": message.timestamp,
        "key": None if message.key is None else _tensor(message.key),
        "value": _tensor(message.value),
        "headers": [[name, _tensor(value)] for name, value in message.headers],
    }


def message_from_state(state: dict[str, Any]) -> Message:
    stream, partition, offset, *sample = state["position"]  # older checkpoints: no index and count
    key = None if state["key"] is None else state["key"].numpy().tobytes()
    headers = tuple((name, value.numpy().tobytes()) for name, value in state["headers"])
    position = Position(stream, int(partition), int(offset), *map(int, sample))
    return Message(position, float(state["timestamp"]), key, state["value"].numpy().tobytes(), headers)


def _on_value(x: np.ndarray, value: bytes) -> np.ndarray:
    """A restored sample's array as a view on its message's value where those are its bytes (the binary encoding),
    as decoding made it: the sample then holds them once, as it did before the checkpoint."""
    return np.frombuffer(value, dtype=x.dtype).reshape(x.shape) if is_value_bytes(x, value) else x


def array_on_value(value: bytes, dtype: Any, shape: Any, sample_id: str) -> np.ndarray:
    """A restored sample's array saved as its layout alone: a view on its message's value, as decoding made it."""
    try:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes != len(value):
            raise ValueError(f"that is {nbytes} bytes")
        return np.frombuffer(value, dtype).reshape(shape)
    except (TypeError, ValueError) as err:
        raise PendingStateError(
            f"pending sample {sample_id!r:.80} has an array of dtype {dtype!r:.40} and shape "
            f"{shape!r:.80}, which does not fit its message's value of {len(value)} bytes ({err})"
        ) from err


def _tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())  # one copy (torch.tensor would add one)
