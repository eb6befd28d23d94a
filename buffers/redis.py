"""Replay store in Redis, shared by any number of learner processes (redis-py + Lua).

One atomic script call (:data:`buffers.lua.STEP`) draws replay samples, then inserts a
micro-batch: the global counter, the slot decisions (exact Algorithm R or CBRS), the sample bytes
and the labels change together, so N learners writing into one buffer keep the statistics of a
single reservoir over their merged streams. ``sample_then_add`` is one call: one round trip per
learner step, with every array packed into one argument or reply value (see :mod:`buffers.lua`).
Samples are stored as raw tensor bytes; dtype and shape are kept once per buffer (never pickle).
Labels are stored by class path when the store has the learner's :class:`~buffers.store.ClassNames`
(learners number classes in their own order of first appearance), else as ``"level:y"``.
What a draw reads is another writer's data: a sample whose bytes, label or layout cannot be read is
left out of the draw and counted (``BufferStats.corrupt``), never raised to the learner; a counter it cannot
read (``seen``, the class counts, a key of another type) is rebuilt from the samples stored and counted
(``BufferStats.repairs``), not taken for an outage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import accumulate, pairwise
from typing import Any, NamedTuple

import numpy as np
import redis
import torch

from buffers import lua
from buffers.balanced import ClassBalancedPolicy
from buffers.memory import MemoryStore
from buffers.reservoir import ReservoirPolicy
from buffers.store import BufferStats, ClassNames, GrowingClassNames, ReplayBatch

log = logging.getLogger("buffers.redis")

POLICIES = {"reservoir": ReservoirPolicy, "class-balanced": ClassBalancedPolicy}
"""Policies the insert script runs (name -> the same policy in memory, for the local fallback)."""

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
"""Errors meaning "Redis is not there right now" (BusyLoadingError, during an AOF load, is one)."""

CORRUPT_LOG_INTERVAL_S = 60.0
"""Least time between two warnings about unreadable buffer entries (every sample left out is counted)."""

NUMERIC_KINDS = "biuf"
"""numpy kinds a stored sample may have: bool, signed and unsigned integers, floats."""

_NOT_TAKEN = struct.pack("<ii", -1, -1)  # a class the numbering does not take now (perhaps later): left out
_UNREADABLE_LEVEL = -2
_UNREADABLE = struct.pack("<ii", _UNREADABLE_LEVEL, _UNREADABLE_LEVEL)  # left out and counted as corrupt


class Layout(NamedTuple):
    """One stored sample as the buffer's meta describes it."""

    dtype: np.dtype
    dims: tuple[int, ...]
    nbytes: int
    packed: bytes
    """``nbytes`` as the script's '<i4' lengths write it."""


def sample_layout(dtype: bytes, shape: bytes) -> Layout | None:
    """The layout a buffer's meta names; None unless a numeric dtype torch takes and positive sizes.

    The meta is any writer's data: numpy parses the dtype string (nothing is unpickled), and object,
    string, structured or foreign byte-order dtypes are refused.
    """
    try:
        array_dtype = np.dtype(dtype.decode("ascii"))
        dims = tuple(int(d) for d in shape.split(b",") if d)
        torch.from_numpy(np.empty((0, *dims), dtype=array_dtype))  # byte order and dimensions torch takes
    except Exception:  # numpy's parser of untrusted text raises TypeError, ValueError, SyntaxError, ...
        return None
    nbytes = array_dtype.itemsize * math.prod(dims)
    if array_dtype.kind not in NUMERIC_KINDS or min(dims, default=1) <= 0 or not 0 < nbytes < 2**31:
        return None
    return Layout(array_dtype, dims, nbytes, struct.pack("<i", nbytes))


class RedisStore:
    """A replay buffer held in Redis under the keys ``streamcl:buffer:{<name>}:*``.

    When Redis cannot be reached, operations fail fast: the error is counted, the store backs
    off (``retry_min_s`` doubling up to ``retry_max_s``) and meanwhile serves inserts and samples
    from a small local :class:`~buffers.memory.MemoryStore` (``fallback_capacity``, 0 = no replay).
    The first call after the back-off tries Redis again and, on success, goes back to the shared
    buffer (the fallback's samples stay local). With AOF on, the buffer survives a Redis restart.
    :attr:`up` is False while the fallback serves; ``len`` and :meth:`stats` then describe the fallback.

    Parameters
    ----------
    client
        A ``redis.Redis`` with ``decode_responses=False`` (see :func:`buffers.open.open_store`).
    capacity
        Number of samples kept; every learner sharing ``name`` must use the same.
    name
        Buffer name: the key namespace.
    policy
        ``"reservoir"`` (exact Algorithm R) or ``"class-balanced"`` (CBRS), run inside the insert
        script; every learner sharing ``name`` must use the same.
    seed
        Seed of the client-side generator that draws the scripts' random numbers.
    device
        Device of the sampled tensors.
    fallback_capacity, retry_min_s, retry_max_s
        Local fallback size and reconnect back-off while Redis is unreachable.
    clock
        Monotonic clock for the back-off.
    classes
        The learner's class numbering (its ``LabelTree``; also settable as :attr:`classes`). With it,
        labels are stored by class path (a JSON array of names) and a draw maps them to this
        learner's ``(level, y)``, adding classes only other learners have seen (a numbering that does
        not take a class maps it to -1: its samples are left out of the draw). Without it, labels
        are this process's ``"level:y"``: right for one learner, wrong for learners that number
        classes differently. Every store sharing ``name`` must do the same.
    max_classes
        Most classes (all levels) a draw may grow a :class:`~buffers.store.GrowingClassNames` to, as
        ``--max-classes`` bounds a stream's (None: no limit). A drawn sample of a class past it, or of
        a path the tree's ``problem`` refuses, is left out and counted as corrupt.
    """

    def __init__(
        self,
        client: redis.Redis,
        capacity: int,
        *,
        name: str = "replay",
        policy: str = "reservoir",
        seed: int = 0,
        device: str | torch.device = "cpu",
        fallback_capacity: int = 200,
        retry_min_s: float = 0.1,
        retry_max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        classes: ClassNames | None = None,
        max_classes: int | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"the Redis store runs {' or '.join(POLICIES)}, got {policy!r}")
        if fallback_capacity < 0:
            raise ValueError(f"fallback_capacity must be >= 0, got {fallback_capacity}")
        if not 0 <= retry_min_s <= retry_max_s:
            raise ValueError(f"need 0 <= retry_min_s <= retry_max_s, got {retry_min_s}, {retry_max_s}")
        self.client = client
        self.capacity = capacity
        self.name = name
        self.policy = policy
        self.device = torch.device(device)
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.keys = [f"streamcl:buffer:{{{name}}}:{k}" for k in lua.KEYS]
        self.fallback = None
        if fallback_capacity:
            local = min(fallback_capacity, capacity)
            self.fallback = MemoryStore(local, policy=POLICIES[policy](local, seed=seed), device=device, seed=seed)
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._sha = hashlib.sha1(lua.STEP.encode()).hexdigest()
        self._errors = self._corrupt = self._repairs = 0
        self._why = ""  # why the last sample counted as corrupt was left out, for the warning
        self._warn_at = -math.inf
        self._retry_at, self._backoff = 0.0, retry_min_s
        self.up = True  # the last call reached Redis (False: replay comes from the fallback until one does)
        self._seen = self._size = self._item_bytes = 0
        self._counts: list[bytes] = []  # [label, count, ...] as last read
        self._conn: redis.Connection | None = None  # taken from the client's pool on first use
        self._pid, self._lock = os.getpid(), threading.Lock()
        self._layouts: dict[tuple[bytes, bytes], Layout | None] = {}
        self.max_classes = max_classes
        self.classes = classes

    @property
    def classes(self) -> ClassNames | None:
        """The learner's class numbering labels are mapped through (None: labels are ``"level:y"``)."""
        return self._classes

    @classes.setter
    def classes(self, classes: ClassNames | None) -> None:
        self._classes = classes
        self._growing = classes if isinstance(classes, GrowingClassNames) else None
        self._forget_labels()

    # -- the ReplayStore API -------------------------------------------------------------------

    def add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> np.ndarray:
        """Insert a micro-batch atomically; returns each sample's slot (-1: not kept or Redis down)."""
        if len(x) == 0:
            return np.empty(0, dtype=np.int64)
        reply = self._step(0, x, y, level)
        if reply is None:
            self._fallback_add(x, y, level)
            return np.full(len(x), -1, dtype=np.int64)
        return np.frombuffer(reply[6], dtype="<i4").astype(np.int64)

    def sample(self, n: int) -> ReplayBatch:
        """Up to ``n`` distinct samples, uniformly without replacement, in one round trip."""
        reply = self._step(n)
        if reply is None:
            return self.fallback.sample(n) if self.fallback is not None else ReplayBatch.empty(self.device)
        return self._read_sample(reply)

    def sample_then_add(self, n: int, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> ReplayBatch:
        """Draw ``n`` samples, then insert the batch: one script call, one round trip."""
        if len(x) == 0:
            return self.sample(n)
        reply = self._step(n, x, y, level)
        if reply is None:
            replay = self.fallback.sample(n) if self.fallback is not None else ReplayBatch.empty(self.device)
            self._fallback_add(x, y, level)
            return replay
        return self._read_sample(reply)

    def __len__(self) -> int:
        """Size of the buffer replay draws from: the shared one as of the last call (other learners may have
        added since) or, while Redis is down, the local fallback."""
        if self.up:
            return self._size
        return len(self.fallback) if self.fallback is not None else 0

    @property
    def seen(self) -> int:
        """Samples ever offered to the shared buffer, by all learners (as of the last reply)."""
        return self._seen

    def stats(self, *, classes: bool = False) -> BufferStats:
        """Size as of the last reply, payload bytes (Redis' own per-entry overhead comes on top), the
        Redis operations that failed and the drawn samples left out as corrupt since this store was made.

        ``classes`` re-reads the class counts from Redis (the last counts read if it is unreachable):
        one round trip, made when asked (at probe time) rather than on every learner step, since the
        counts grow with the number of classes while the steps' replies stay the same size. With
        :attr:`classes`, classes this learner has not seen yet are left out (counting them would add
        them to its tree outside a learning step), as are labels it cannot read.

        While Redis is down the figures are the local fallback's (what replay draws from meanwhile), not the
        shared buffer's last reply; the counts of failures, corrupt samples and repairs stay this store's.
        """
        if classes:
            self.refresh()
        if not self.up:
            local = self.fallback.stats(classes=classes) if self.fallback is not None else BufferStats(0, 0, 0, 0)
            return replace(local, errors=self._errors, corrupt=self._corrupt, repairs=self._repairs)
        counts = self._class_counts() if classes else {}
        nbytes = self._size * (self._item_bytes + 8)
        return BufferStats(self._size, self.capacity, nbytes, self._errors, counts, self._corrupt, self._repairs)

    def _class_counts(self) -> dict[tuple[int, int], int]:
        """The shared buffer's samples per class ``(level, y)`` as last read, in this learner's numbering."""
        counts: dict[tuple[int, int], int] = {}
        for label, count in zip(self._counts[0::2], self._counts[1::2], strict=True):
            try:
                parsed = self._parse(label)
            except ValueError as error:
                self._warn(f"{error}; left out of the class counts")
                continue
            key = parsed if self._classes is None else self._classes.lookup(parsed)
            if key != (-1, -1) and count.isdigit():
                counts[key] = counts.get(key, 0) + int(count)
        return counts

    def refresh(self) -> bool:
        """Re-read seen, size and class counts from Redis; False when Redis is unreachable."""
        return self._step(0) is not None

    def clear(self) -> None:
        """Delete the shared buffer (every learner's samples)."""
        self.client.delete(*self.keys[:-1], *self.client.scan_iter(match=f"{self.keys[-1]}*"))
        self._seen = self._size = 0
        self._counts = []

    def state_dict(self) -> dict[str, Any]:
        """The client side only (generator, fallback); the samples live in Redis."""
        return {
            "name": self.name,
            "rng": self._rng.bit_generator.state,
            "fallback": self.fallback.state_dict() if self.fallback is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore generator and fallback; label encodings are re-made (the learner restores its tree first)."""
        self._forget_labels()
        self._rng.bit_generator.state = state["rng"]
        if self.fallback is not None and state["fallback"] is not None:
            self.fallback.load_state_dict(state["fallback"])

    # -- Redis calls ----------------------------------------------------------------------------

    def _step(
        self, draw: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None, level: torch.Tensor | None = None
    ) -> list | None:
        """Draw ``draw`` samples, then insert the batch (if any), in one script call; None if Redis is down.

        The reply's seen, size and class counts update the store's view of the shared buffer.
        """
        if self._clock() < self._retry_at:
            return None
        head, n, labels, data = ["", ""], 0, b"", b""
        if x is not None:
            array = x.detach().cpu().contiguous().numpy()
            n, self._item_bytes, data = len(array), array[0].nbytes, array.tobytes()
            head = [array.dtype.str, ",".join(map(str, array.shape[1:]))]
            labels = self._pack_labels(level, y)
        uniforms = self._rng.random(max(draw, 0) + 2 * n).astype("<f8", copy=False).tobytes()
        args = [self.capacity, *head, self.policy, self._item_bytes, max(draw, 0), n, uniforms, labels, data]
        try:
            reply = self._eval(args)
        except (*UNAVAILABLE, redis.ResponseError) as error:
            if isinstance(error, redis.ResponseError) and str(error).startswith("SHAPE"):
                raise ValueError(f"Redis buffer {self.name!r}: {str(error)[len('SHAPE ') :]}") from None
            self._errors += 1
            self.up = False
            self._retry_at = self._clock() + self._backoff
            log.warning("buffer %r: redis unavailable (%s); retry in %.2fs", self.name, error, self._backoff)
            self._backoff = min(max(2 * self._backoff, self.retry_min_s), self.retry_max_s)
            return None
        self._backoff, self.up = self.retry_min_s, True
        self._seen, self._size = int(reply[4]), int(reply[5])
        if reply[10]:
            self._repairs += int(reply[10])
            self._warn(f"buffer {self.name!r}: rebuilt {reply[10]} damaged or foreign key(s) from the samples stored")
        if not draw and x is None:  # counts come only with a call that neither draws nor inserts
            self._counts = reply[7]
        return reply

    def _eval(self, args: list) -> list:
        command = ("EVALSHA", self._sha, len(self.keys), *self.keys, *args)
        try:
            return self._send(command)
        except redis.exceptions.NoScriptError:  # after a restart (or SCRIPT FLUSH) the script cache is empty
            self._send(("SCRIPT", "LOAD", lua.STEP))
            return self._send(command)

    def _send(self, command: tuple) -> Any:
        """One command on the store's own connection, retried as the client's ``retry`` says.

        Holding one connection skips the pool's per-command check-out (a lock and a poll() of the
        socket) and redis-py's per-command bookkeeping: about 13 us of the learner's CPU per step.
        A connection broken by a server restart is reconnected by the retry, as the pool would.
        """
        with self._lock:  # one command at a time on the connection (a probe may read counts from another thread)
            if self._conn is None or self._pid != os.getpid():  # a forked child takes its own
                self._conn, self._pid = self.client.connection_pool.get_connection(), os.getpid()
            conn = self._conn
            return conn.retry.call_with_retry(lambda: self._exchange(conn, command), lambda _: conn.disconnect())

    @staticmethod
    def _exchange(conn: redis.Connection, command: tuple) -> Any:
        conn.send_packed_command(conn.pack_command(*command))
        return conn.read_response()

    # -- decoding -------------------------------------------------------------------------------

    def _read_sample(self, reply: list) -> ReplayBatch:
        dtype, shape, drawn, data = reply[:4]
        if not drawn:
            return ReplayBatch.empty(self.device)
        m = len(drawn) // 4
        layout = self._layout(dtype, shape)
        if layout is None:
            self._dropped(
                m, f"Redis buffer {self.name!r} holds samples of unreadable dtype {dtype[:40]!r}[{shape[:80]!r}]"
            )
            return ReplayBatch.empty(self.device)
        slots = np.frombuffer(drawn, dtype="<i4").astype(np.int64)
        level, y = self._unpack_labels(reply[8], m)
        if reply[9] != layout.packed * m:  # some sample's bytes are missing or of another size
            data = self._cut(data, reply[9], layout.nbytes, slots, level)
        x = np.frombuffer(data, dtype=layout.dtype).reshape(m, *layout.dims)
        self._item_bytes = layout.nbytes
        taken = level >= 0
        if not taken.all():  # classes the numbering does not take (see ClassNames) and corrupt samples are left out
            corrupt = int(np.count_nonzero(level == _UNREADABLE_LEVEL))
            if corrupt:
                self._dropped(corrupt, self._why)
            x, y, level, slots = x[taken], y[taken], level[taken], slots[taken]
        tensors = [torch.from_numpy(array) for array in (x.copy(), y, level, slots)]
        if self.device.type != "cpu":
            tensors = [t.to(self.device) for t in tensors]
        return ReplayBatch(*tensors)

    def _layout(self, dtype: bytes, shape: bytes) -> Layout | None:
        if (dtype, shape) not in self._layouts:
            self._layouts[dtype, shape] = sample_layout(dtype, shape)
        return self._layouts[dtype, shape]

    def _cut(self, data: bytes, sizes: bytes, nbytes: int, slots: np.ndarray, level: np.ndarray) -> bytes:
        """The drawn bytes, one sample every ``nbytes``: a sample of another size is zeros, its level unreadable."""
        lengths = np.frombuffer(sizes, dtype="<i4")
        fits = lengths == nbytes
        bad = int(np.flatnonzero(~fits)[0])
        self._why = (
            f"Redis buffer {self.name!r} slot {slots[bad]} holds {lengths[bad]} bytes, not one sample's {nbytes}"
        )
        level[~fits] = _UNREADABLE_LEVEL
        starts = (np.cumsum(lengths) - lengths).tolist()
        blank = bytes(nbytes)
        return b"".join([data[s : s + nbytes] if ok else blank for s, ok in zip(starts, fits.tolist(), strict=True)])

    def _dropped(self, n: int, why: str) -> None:
        self._corrupt += n
        self._warn(f"{why}; {n} drawn sample(s) left out")

    def _warn(self, message: str) -> None:
        """Log a damaged or foreign buffer entry: at once, then at most once per interval (each is counted)."""
        now = self._clock()
        if now >= self._warn_at:
            self._warn_at = now + CORRUPT_LOG_INTERVAL_S
            log.warning(
                "%s (%d corrupt samples left out of draws so far; next warning in %.0f s at the earliest)",
                message,
                self._corrupt,
                CORRUPT_LOG_INTERVAL_S,
            )

    # -- labels: one opaque string per class in Redis, cached both ways on the client ------------

    def _forget_labels(self) -> None:
        """Drop the cached encodings: a new or reloaded class numbering maps indices to other classes."""
        self._encoded: dict[tuple[int, int], bytes] = {}  # (level, y) -> '<i4' length + label
        self._decoded: dict[bytes, bytes] = {}  # label -> (level, y) as two '<i4'

    def _pack_labels(self, level: torch.Tensor, y: torch.Tensor) -> bytes:
        """The batch's labels as the script takes them: each its '<i4' byte length, then its bytes."""
        cache = self._encoded
        return b"".join([cache.get(key) or self._encode(key) for key in zip(level.tolist(), y.tolist(), strict=True)])

    def _encode(self, key: tuple[int, int]) -> bytes:
        if self._classes is None:
            label = f"{key[0]}:{key[1]}".encode()
        else:
            label = json.dumps(self._classes.path(*key), ensure_ascii=False, separators=(",", ":")).encode()
        self._encoded[key] = packed = len(label).to_bytes(4, "little") + label
        return packed

    def _unpack_labels(self, blob: bytes, m: int) -> tuple[np.ndarray, np.ndarray]:
        """``(level, y)`` of ``m`` drawn labels; with :attr:`classes`, classes new to it are added to it."""
        ends = list(accumulate(struct.unpack_from(f"<{m}i", blob), initial=4 * m))
        labels = [blob[start:end] for start, end in pairwise(ends)]
        cache = self._decoded
        pairs = b"".join([cache[label] if label in cache else self._decode(label) for label in labels])
        level, y = np.frombuffer(pairs, dtype="<i4").reshape(-1, 2).T.astype(np.int64, order="C")
        return level, y

    def _decode(self, label: bytes) -> bytes:
        """A stored label's (level, y) in this learner's numbering (with :attr:`classes`, adding its class).

        A label that cannot be read, or whose class the learner's tree refuses, is unreadable: left out of
        the draw, counted, and not cached (a bad entry is rare; caching it would let junk fill the cache).
        """
        try:
            parsed = self._parse(label)
        except ValueError as error:
            return self._unreadable(str(error))
        if self._classes is not None:
            problem = self._problem(parsed)
            if problem is not None:
                return self._unreadable(f"Redis buffer {self.name!r} holds label {label[:80]!r}, refused: {problem}")
            level, y, _ = self._classes.encode([parsed])
            parsed = int(level[0]), int(y[0])
            if parsed[0] < 0:  # not taken now, perhaps later: not cached
                return _NOT_TAKEN
        self._decoded[label] = pair = struct.pack("<ii", *parsed)
        return pair

    def _unreadable(self, why: str) -> bytes:
        self._why = why
        return _UNREADABLE

    def _problem(self, path: tuple[str, ...]) -> str | None:
        """Why a draw must not add ``path`` to the learner's tree, as the run loop refuses a stream's label
        (too deep, a known class under another parent, past ``max_classes``); None if it may."""
        tree = self._growing
        if tree is None:  # a numbering that adds no classes (KnownClasses) maps only the ones it has
            return None
        problem = tree.problem(path)
        if problem is None and self.max_classes is not None:
            new = sum(tree.lookup(path[: depth + 1])[0] < 0 for depth in range(len(path)))
            if new and sum(tree.sizes) + new > self.max_classes:
                problem = f"more than {self.max_classes} classes (max_classes)"
        return problem

    def _parse(self, label: bytes) -> Any:
        """A stored label as a class path (with :attr:`classes`) or ``(level, y)``; ValueError if it is not one."""
        try:
            if self._classes is None:
                level, y = map(int, label.split(b":"))
                if not (0 <= level < 2**31 and 0 <= y < 2**31):
                    raise ValueError("not a level and index")
                return level, y
            path = tuple(json.loads(label)) if label.startswith(b"[") else ()
            if not path or not all(isinstance(name, str) and name for name in path):
                raise ValueError("not a class path")
            return path
        except (ValueError, RecursionError):  # json raises RecursionError for arrays nested too deep
            kind = "by class path" if self._classes is not None else 'as "level:y"'
            raise ValueError(
                f"Redis buffer {self.name!r} holds label {label[:80]!r}, but this store reads labels {kind}: "
                "every learner sharing a buffer must store labels the same way"
            ) from None

    def _fallback_add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        if self.fallback is not None:
            self.fallback.add(x, y, level)
