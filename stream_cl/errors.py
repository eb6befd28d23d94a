"""Errors users see. ``retriable`` tells a supervisor whether trying again can help."""

from __future__ import annotations


class StreamClError(Exception):
    """Base of stream-cl's own errors."""

    retriable = False


class ConfigError(StreamClError, ValueError):
    """A bad setting: unknown key, bad value, or conflicting options."""


class SourceError(StreamClError):
    """A source cannot be opened or read (missing file, unreachable broker)."""

    retriable = True
