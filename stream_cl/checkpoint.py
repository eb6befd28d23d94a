"""Checkpoint files: versioned, checksummed, written atomically, loadable with ``weights_only=True``.

A checkpoint directory holds files named ``ckpt-<id:010d>-<sha256[:16]>.pt``. The id grows by one
per checkpoint; the digest in the name is that of the file's bytes, so a truncated or corrupted
file is recognised before ``torch.load`` even sees it. A file appears under its final name only
after its bytes are on disk (temp file, fsync, rename, directory fsync), so a crash leaves either
the old set or the old set plus one complete new file. The payload is a dict of tensors and plain
containers (no pickled objects).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stream_cl.errors import StreamClError

log = logging.getLogger("stream_cl.checkpoint")

FORMAT_VERSION = 1
"""Version of the payload layout; a checkpoint of another version is refused, never guessed at."""

_NAME = re.compile(r"^ckpt-(\d{10})-([0-9a-f]{16})\.pt$")


class CheckpointError(StreamClError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or of another format."""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One checkpoint file as listed in its directory (nothing read yet)."""

    id: int
    path: Path
    digest: str
    size: int
    mtime: float


class CheckpointStore:
    """A directory of checkpoints: write (atomic), list, load (verified), prune.

    Parameters
    ----------
    directory
        Created if missing.
    keep
        Newest checkpoints kept after each write (>= 1); older ones are deleted.
    sweep
        Delete temp files a crash left mid-write. Only the process that writes checkpoints does (at its
        start): anyone else opening the directory (``stream-cl checkpoint``, an export) could be deleting
        the checkpoint a running service is writing.

    Examples
    --------
    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
    >>> [store.write({"n": torch.tensor(i)}).id for i in range(3)]
    [1, 2, 3]
    >>> [c.id for c in store.list()], int(store.latest()[1]["n"])
    ([2, 3], 2)
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, sweep: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        if sweep:
            for stale in self.directory.glob(".ckpt-*.tmp"):
                stale.unlink(missing_ok=True)  # left by a crash mid-write; never renamed, so never valid

    def list(self) -> list[CheckpointInfo]:
        """Checkpoints in the directory, oldest first."""
        out = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                try:
                    stat = path.stat()
                except FileNotFoundError:  # pruned by a writer since the listing: a reader may run beside it
                    continue
                out.append(CheckpointInfo(int(match[1]), path, match[2], stat.st_size, stat.st_mtime))
        return sorted(out, key=lambda c: c.id)

    def get(self, checkpoint_id: int) -> CheckpointInfo:
        for info in self.list():
            if info.id == checkpoint_id:
                return info
        raise CheckpointError(f"no checkpoint {checkpoint_id} in {self.directory}")

    def write(self, payload: dict[str, Any]) -> CheckpointInfo:
        """Write ``payload`` (plus ``format``, ``id`` and ``created``) as the next checkpoint, then prune."""
        existing = self.list()
        checkpoint_id = existing[-1].id + 1 if existing else 1
        buffer = io.BytesIO()
        torch.save({**payload, "format": FORMAT_VERSION, "id": checkpoint_id, "created": time.time()}, buffer)
        data = buffer.getbuffer()
        digest = hashlib.sha256(data).hexdigest()[:16]
        path = self.directory / f"ckpt-{checkpoint_id:010d}-{digest}.pt"
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)  # only still there if writing failed
        _fsync_dir(self.directory)
        self.prune()
        return CheckpointInfo(checkpoint_id, path, digest, len(data), time.time())

    def load(self, info: CheckpointInfo) -> dict[str, Any]:
        """The verified payload of ``info``.

        Raises
        ------
        CheckpointError
            If the bytes do not match the digest, do not load, or have another format version.
        """
        try:
            data = info.path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{info.path.name}: {err}") from err
        if hashlib.sha256(data).hexdigest()[:16] != info.digest:
            raise CheckpointError(f"{info.path.name}: checksum mismatch (truncated or corrupted)")
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad archives
            raise CheckpointError(f"{info.path.name}: cannot load: {err}") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            version = payload.get("format") if isinstance(payload, dict) else None
            raise CheckpointError(f"{info.path.name}: format {version!r}, expected {FORMAT_VERSION}")
        return payload

    def latest(self) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads; bad newer ones are logged and skipped."""
        for info in reversed(self.list()):
            try:
                return info, self.load(info)
            except CheckpointError as err:
                log.warning("skipping checkpoint %d: %s", info.id, err)
        return None

    def prune(self) -> None:
        for info in self.list()[: -self.keep]:
            info.path.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the entry lives in the directory's own data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
