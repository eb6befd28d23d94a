"""Benchmarks behind ``stream-cl bench``; each writes JSON, markdown and PNG plots."""

from __future__ import annotations
