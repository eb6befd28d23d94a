"""Both replay backends behind one factory: ``make_store(capacity, seed=..., name=..., policy=...)``."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from buffers.open import open_store
from buffers.store import ReplayStore
from tests.fixtures.redis import RedisServer

_names = itertools.count()


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., ReplayStore]:
    """Fresh stores of the parametrized backend; Redis buffers get unique names on one server."""
    if request.param == "memory":
        return lambda capacity, seed=0, name=None, policy="reservoir": open_store(
            "memory", capacity, seed=seed, policy=policy
        )
    server: RedisServer = request.getfixturevalue("redis_server")

    def make(capacity: int, seed: int = 0, name: str | None = None, policy: str = "reservoir") -> ReplayStore:
        name = name or f"{request.node.name}-{next(_names)}"
        store = open_store(f"{server.url}?name={name}", capacity, seed=seed, policy=policy)
        store.clear()
        return store

    return make
