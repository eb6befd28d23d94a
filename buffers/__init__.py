"""Replay buffers: which samples stay (policies) apart from where they live (stores).

A policy looks at a micro-batch and decides, vectorised, which slot each sample goes to
(or none). A store keeps the slots: preallocated device tensors (:mod:`buffers.memory`) or a
Redis server shared by many learners (:mod:`buffers.redis`). :func:`open_store` maps a spec
(``memory``, ``redis://...``, ``rediss://...``) to a store.
"""

from __future__ import annotations

from buffers.balanced import ClassBalancedPolicy, LargestClassPolicy
from buffers.memory import MemoryStore
from buffers.open import POLICIES, make_policy, open_store
from buffers.policy import SlotPolicy
from buffers.redis import RedisStore
from buffers.reservoir import ReservoirPolicy
from buffers.store import BufferStats, ReplayBatch, ReplayStore

__all__ = [
    "POLICIES",
    "BufferStats",
    "ClassBalancedPolicy",
    "LargestClassPolicy",
    "MemoryStore",
    "RedisStore",
    "ReplayBatch",
    "ReplayStore",
    "ReservoirPolicy",
    "SlotPolicy",
    "make_policy",
    "open_store",
]
