"""One module per CLI command, each with ``register(subparsers)``."""

from __future__ import annotations
