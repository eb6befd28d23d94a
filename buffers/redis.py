"""Replay store in Redis, shared by any number of learner processes (redis-py + Lua).

One atomic script call inserts a micro-batch: the global counter, the slot decisions (exact
Algorithm R), the sample bytes and the labels change together, so N learners writing into one
buffer keep the statistics of a single reservoir over their merged streams. ``sample_then_add``
sends the sample script and the insert script in one pipeline: one round trip per learner step.
Samples are stored as raw tensor bytes; dtype and shape are kept once per buffer (never pickle).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis
import torch

from buffers import lua
from buffers.balanced import ClassBalancedPolicy
from buffers.memory import MemoryStore
from buffers.policy import last_write_wins
from buffers.reservoir import ReservoirPolicy
from buffers.store import ReplayBatch

log = logging.getLogger("buffers.redis")

POLICIES = {"reservoir": ReservoirPolicy, "class-balanced": ClassBalancedPolicy}
"""Policies the insert script runs (name -> the same policy in memory, for the local fallback)."""

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
"""Errors meaning "Redis is not there right now" (BusyLoadingError, during an AOF load, is one)."""


class RedisStore:
    """A replay buffer held in Redis under the keys ``streamcl:buffer:{<name>}:*``.

    When Redis cannot be reached, operations fail fast: the error is counted, the store backs
    off (``retry_min_s`` doubling up to ``retry_max_s``) and meanwhile serves inserts and samples
    from a small local :class:`~buffers.memory.MemoryStore` (``fallback_capacity``, 0 = no replay).
    The first call after the back-off tries Redis again and, on success, goes back to the shared
    buffer (the fallback's samples stay local). With AOF on, the buffer survives a Redis restart.

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
        self._sha = {code: hashlib.sha1(code.encode()).hexdigest() for code in (lua.INSERT, lua.SAMPLE, lua.STATS)}
        self._errors = self._taken = 0
        self._retry_at, self._backoff = 0.0, retry_min_s
        self._seen = self._size = self._item_bytes = 0
        self._counts: dict[tuple[int, int], int] = {}

    # -- the ReplayStore API -------------------------------------------------------------------

    def add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> np.ndarray:
        """Insert a micro-batch atomically; returns each sample's slot (-1: not kept or Redis down)."""
        if len(x) == 0:
            return np.empty(0, dtype=np.int64)
        replies = self._run([(lua.INSERT, self._insert_args(x, y, level))])
        if replies is None:
            self._fallback_add(x, y, level)
            return np.full(len(x), -1, dtype=np.int64)
        return self._read_insert(replies[0])

    def sample(self, n: int) -> ReplayBatch:
        """Up to ``n`` distinct samples, uniformly without replacement, in one round trip."""
        replies = self._run([(lua.SAMPLE, self._sample_args(n))])
        if replies is None:
            return self.fallback.sample(n) if self.fallback is not None else ReplayBatch.empty(self.device)
        return self._read_sample(replies[0])

    def sample_then_add(self, n: int, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> ReplayBatch:
        """Draw ``n`` samples, then insert the batch: both scripts in one pipelined round trip."""
        if len(x) == 0:
            return self.sample(n)
        replies = self._run([(lua.SAMPLE, self._sample_args(n)), (lua.INSERT, self._insert_args(x, y, level))])
        if replies is None:
            replay = self.fallback.sample(n) if self.fallback is not None else ReplayBatch.empty(self.device)
            self._fallback_add(x, y, level)
            return replay
        replay = self._read_sample(replies[0])
        self._read_insert(replies[1])  # after the sample: its size is the newer
        return replay

    def class_counts(self) -> dict[tuple[int, int], int]:
        """Stored samples per class ``(level, y)`` as of this store's last insert or :meth:`refresh`."""
        return dict(self._counts)

    def __len__(self) -> int:
        """Buffer size as of the last call (other learners may have added since)."""
        return self._size

    @property
    def seen(self) -> int:
        """Samples ever offered to the shared buffer, by all learners (as of the last reply)."""
        return self._seen

    @property
    def nbytes(self) -> int:
        """Sample and label payload bytes (Redis' own per-entry overhead comes on top)."""
        return self._size * (self._item_bytes + 8)

    @property
    def errors(self) -> int:
        """Redis operations that failed since this store was made."""
        return self._errors

    def take_errors(self) -> int:
        """Failures since the previous call (to increment a counter)."""
        new, self._taken = self._errors - self._taken, self._errors
        return new

    def refresh(self) -> bool:
        """Re-read seen, size and class counts from Redis; False when Redis is unreachable."""
        replies = self._run([(lua.STATS, [])])
        if replies is not None:
            self._read_stats(replies[0])
        return replies is not None

    def clear(self) -> None:
        """Delete the shared buffer (every learner's samples)."""
        self.client.delete(*self.keys[:-1], *self.client.scan_iter(match=f"{self.keys[-1]}*"))
        self._seen = self._size = 0
        self._counts = {}

    def state_dict(self) -> dict[str, Any]:
        """The client side only (generator, fallback); the samples live in Redis."""
        return {
            "name": self.name,
            "rng": self._rng.bit_generator.state,
            "fallback": self.fallback.state_dict() if self.fallback is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        if self.fallback is not None and state["fallback"] is not None:
            self.fallback.load_state_dict(state["fallback"])

    # -- Redis calls ----------------------------------------------------------------------------

    def _run(self, calls: list[tuple[str, list]]) -> list | None:
        """Run the scripts in one pipeline; None (error counted, back-off set) if Redis is unavailable."""
        if self._clock() < self._retry_at:
            return None
        try:
            replies = self._pipeline(calls)
        except (*UNAVAILABLE, redis.ResponseError) as error:
            if isinstance(error, redis.ResponseError) and str(error).startswith("SHAPE"):
                raise ValueError(f"Redis buffer {self.name!r}: {str(error)[len('SHAPE ') :]}") from None
            self._errors += 1
            self._retry_at = self._clock() + self._backoff
            log.warning("buffer %r: redis unavailable (%s); retry in %.2fs", self.name, error, self._backoff)
            self._backoff = min(max(2 * self._backoff, self.retry_min_s), self.retry_max_s)
            return None
        self._backoff = self.retry_min_s
        return replies

    def _pipeline(self, calls: list[tuple[str, list]]) -> list:
        pipe = self.client.pipeline(transaction=False)
        for code, args in calls:
            pipe.evalsha(self._sha[code], len(self.keys), *self.keys, *args)
        replies = pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            # After a restart (or SCRIPT FLUSH) the script cache is empty: load and rerun that one call.
            if isinstance(reply, redis.exceptions.NoScriptError):
                code, args = calls[i]
                self.client.script_load(code)
                replies[i] = self.client.evalsha(self._sha[code], len(self.keys), *self.keys, *args)
            elif isinstance(reply, Exception):
                raise reply
        return replies

    # -- encoding -------------------------------------------------------------------------------

    def _insert_args(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> list:
        """All samples' bytes go as one argument (cut by the script): fewer, larger socket writes."""
        array = x.detach().cpu().contiguous().numpy()
        self._item_bytes = array[0].nbytes
        shape = ",".join(map(str, array.shape[1:]))
        head = [self.capacity, array.dtype.str, shape, self.policy, len(array), self._item_bytes]
        draws = [repr(u) for u in self._rng.random(2 * len(array)).tolist()]
        labels = [f"{lv}:{c}" for lv, c in zip(level.tolist(), y.tolist(), strict=True)]
        return [*head, array.tobytes(), *draws, *labels]

    def _sample_args(self, n: int) -> list:
        return [n, *(repr(u).encode() for u in self._rng.random(max(n, 0)).tolist())]

    def _read_insert(self, reply: list) -> np.ndarray:
        slots, seen, size, counts = reply
        self._read_stats([seen, size, counts])
        return last_write_wins(np.asarray(slots, dtype=np.int64))

    def _read_stats(self, reply: list) -> None:
        seen, size, counts = reply
        self._seen, self._size = int(seen), int(size)
        flat = counts.split()
        pairs = (tuple(map(int, k.split(b":"))) for k in flat[0::2])
        self._counts = dict(zip(pairs, map(int, flat[1::2]), strict=True))

    def _read_sample(self, reply: list) -> ReplayBatch:
        slots, labels, blobs, dtype, shape, size = reply
        self._size = int(size)
        if not slots:
            return ReplayBatch.empty(self.device)
        dims = tuple(int(d) for d in shape.split(b",") if d)
        x = np.frombuffer(b"".join(blobs), dtype=np.dtype(dtype.decode())).reshape(len(slots), *dims)
        level_y = np.array([[int(part) for part in label.split(b":")] for label in labels], dtype=np.int64)
        self._item_bytes = x[0].nbytes
        return ReplayBatch(
            torch.from_numpy(x.copy()).to(self.device),
            torch.from_numpy(level_y[:, 1]).to(self.device),
            torch.from_numpy(level_y[:, 0]).to(self.device),
            torch.as_tensor(slots, dtype=torch.long, device=self.device),
        )

    def _fallback_add(self, x: torch.Tensor, y: torch.Tensor, level: torch.Tensor) -> None:
        if self.fallback is not None:
            self.fallback.add(x, y, level)
