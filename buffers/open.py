"""Open a replay store from a spec: ``memory``, ``redis://...`` or ``rediss://...``."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from buffers.balanced import ClassBalancedPolicy, LargestClassPolicy
from buffers.memory import MemoryStore
from buffers.policy import SlotPolicy
from buffers.redis import RedisStore
from buffers.reservoir import ReservoirPolicy
from buffers.store import ClassNames, ReplayStore
from consumers.urls import mask_url

POLICIES = {
    "reservoir": ReservoirPolicy,
    "class-balanced": ClassBalancedPolicy,
    "balanced-reservoir": LargestClassPolicy,
}
"""Policy name -> class (each takes ``(capacity, *, seed)``). Redis runs ``reservoir`` and ``class-balanced``."""


def make_policy(name: str, capacity: int, *, seed: int = 0) -> SlotPolicy:
    """The policy registered as ``name``; ValueError lists the choices for an unknown one."""
    if name not in POLICIES:
        raise ValueError(f"unknown buffer policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](capacity, seed=seed)


def open_store(
    spec: str,
    capacity: int,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    policy: str = "reservoir",
    name: str | None = None,
    fallback_capacity: int = 200,
    socket_timeout_s: float = 2.0,
    classes: ClassNames | None = None,
    max_classes: int | None = None,
) -> ReplayStore:
    """A replay store for ``spec``.

    ``memory`` keeps the buffer in this process (any policy of :data:`POLICIES`).
    ``redis://[user:password@]host:port/db`` and ``rediss://...`` (TLS; ``ssl_ca_certs`` and
    friends as URL query, as redis-py reads them) open a shared :class:`~buffers.redis.RedisStore`
    (``reservoir`` or ``class-balanced``); its buffer name comes from ``name`` or the URL query
    ``?name=`` (default ``replay``). Learners using the same URL and name share one buffer.
    ``classes`` (the learner's label tree) makes a Redis store keep labels by class path, so
    learners that number classes differently share them by name; the memory store ignores it.
    ``max_classes`` bounds the classes a Redis draw may add to that tree (other learners' classes).

    A Redis server that cannot be reached or refuses the credentials at open is a
    ``ConnectionError`` (the URL in its message has the password masked): a learner does not
    start on a silent local fallback. Outages after a good start are the store's back-off.

    Examples
    --------
    >>> open_store("memory", 10, policy="class-balanced").policy.__class__.__name__
    'ClassBalancedPolicy'
    """
    if spec == "memory":
        return MemoryStore(capacity, policy=make_policy(policy, capacity, seed=seed), device=device, seed=seed)
    parts = urlsplit(spec)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"buffer must be 'memory', 'redis://...' or 'rediss://...', got {mask_url(spec)!r}")
    query = parse_qsl(parts.query)
    name = name or dict(query).get("name", "replay")
    url = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "name"])))
    client = redis_client(url, socket_timeout_s=socket_timeout_s)
    store = RedisStore(
        client,
        capacity,
        name=name,
        policy=policy,
        seed=seed,
        device=device,
        fallback_capacity=fallback_capacity,
        classes=classes,
        max_classes=max_classes,
    )
    try:
        client.ping()  # connects and, with credentials in the URL, authenticates
    except redis.RedisError as error:
        client.close()
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConnectionError(f"cannot reach the Redis buffer at {mask_url(url)}: {reason}") from None
    return store


def redis_client(url: str, *, socket_timeout_s: float = 2.0) -> redis.Redis:
    """A client for a replay store: bytes replies, short timeouts, one immediate retry.

    The URL carries AUTH (``redis://user:password@host``) and TLS (``rediss://``, with redis-py's
    ``ssl_*`` query options); its query options win over these defaults. The single retry
    reconnects a pooled connection broken by a server restart; longer outages are the store's
    back-off, not redis-py's (whose default retries for seconds). A timeout is not retried: the
    script may have run, and running it again would insert the batch twice.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )
