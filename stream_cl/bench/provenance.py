"""Which code produced a benchmark result: the git commit (when run from a checkout) and the stream-cl version."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import stream_cl

_SOURCE_ROOT = Path(stream_cl.__file__).resolve().parent.parent


def git_commit(directory: Path = _SOURCE_ROOT, timeout_s: float = 5.0) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding ``directory``; None outside a checkout or without git."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def provenance() -> dict[str, Any]:
    """``{"git_commit": ..., "stream_cl_version": ...}`` for a benchmark's JSON."""
    return {"git_commit": git_commit(), "stream_cl_version": stream_cl.__version__}
