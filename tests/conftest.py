"""Shared fixtures. Real-service fixtures (broker, redis-server, prometheus) live in
``tests/fixtures/`` and are registered here; they fail, never skip, when a service is missing."""

from __future__ import annotations

import os

import torch

# Two cores are shared by the learner, the services and pytest: one intra-op thread keeps timings sane.
torch.set_num_threads(int(os.environ.get("STREAMCL_TEST_THREADS", "1")))

pytest_plugins: list[str] = ["tests.fixtures.redis", "tests.fixtures.prometheus", "tests.fixtures.kafka"]
