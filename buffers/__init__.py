"""Replay buffers: which samples stay (policies) apart from where they live (stores).

A policy looks at a micro-batch and decides, vectorised, which slot each sample goes to
(or none). A store keeps the slots: preallocated device tensors (:mod:`buffers.memory`) or a
Redis server shared by many learners (:mod:`buffers.redis`).
"""

from __future__ import annotations

from buffers.memory import MemoryStore
from buffers.reservoir import ReservoirPolicy
from buffers.store import ReplayBatch, ReplayStore

__all__ = ["MemoryStore", "ReplayBatch", "ReplayStore", "ReservoirPolicy"]
