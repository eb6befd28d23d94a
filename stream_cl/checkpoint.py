"""Checkpoint files: versioned, checksummed, written atomically, loadable with ``weights_only=True``.

A checkpoint directory holds files named ``ckpt-<id:010d>-<sha256[:16]>.pt`` (an id past 10 digits
takes more). The id grows by one per checkpoint; the digest in the name is that of the file's bytes,
so a truncated or corrupted file is recognised before ``torch.load`` even sees it. A file appears
under its final name only after its bytes are on disk (temp file, fsync, rename, directory fsync), so
a crash leaves either the old set or the old set plus one complete new file. The payload is a dict of
tensors and plain containers (no pickled objects) whose top-level keys are checked on load, so a file
that verifies but lacks what a restore reads is skipped like a corrupted one, though never deleted: another
version of stream-cl may have written it. One writer per directory: it holds an exclusive lock on
``DIR/.lock`` for as long as its store is open.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import io
import logging
import os
import re
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stream_cl.errors import StreamClError

log = logging.getLogger("stream_cl.checkpoint")

FORMAT_VERSION = 1
"""Version of the payload layout; a checkpoint of another version is refused (and kept), never guessed at."""

# ASCII digits only (``\d`` takes any script's); 10 of them, or more without a leading zero from id 10**10 on,
# so one id has one name
_NAME = re.compile(r"ckpt-(0[0-9]{9}|[1-9][0-9]{9,})-([0-9a-f]{16})\.pt")

_LOCK = ".lock"


class CheckpointError(StreamClError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or of another format."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint whose bytes verify but that this version cannot read: another format version or layout,
    or an archive this torch cannot load. Another version of stream-cl wrote it, so it is kept."""


class CheckpointUnreadableError(CheckpointError):
    """A checkpoint that cannot be read (no permission, an I/O error): it may well be intact, so it is kept."""


class CheckpointDirInUseError(CheckpointError):
    """Another process (a running service, a ``checkpoint restore``) writes checkpoints to the directory."""


Types = type | tuple[type, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """Top-level keys a payload must (``required``) or may (``optional``) have, and the types of their values."""

    required: Mapping[str, Types]
    optional: Mapping[str, Types] = field(default_factory=dict)

    def problem(self, payload: Mapping[str, Any]) -> str | None:
        """What is wrong with ``payload``'s keys (None: nothing)."""
        missing = sorted(self.required.keys() - payload.keys())
        if missing:
            return f"missing {', '.join(map(repr, missing))}"
        for key, types in (*self.required.items(), *self.optional.items()):
            if key in payload and not isinstance(payload[key], types):
                return f"{key!r} is a {type(payload[key]).__name__}"
        return None


_STORE_KEYS = Layout({"format": int, "id": int, "created": (int, float)})
"""What :meth:`CheckpointStore.write` adds to every payload."""

RUN_LAYOUT = Layout(
    required={
        "identity": dict,
        "input_shape": (list, tuple),
        "input_dtype": str,
        "offsets": (list, tuple),
        "learned_total": int,
        "learner": dict,
    },
    # absent from checkpoints written before they existed; read with defaults
    optional={"within": (list, tuple), "totals": dict, "probe": (dict, type(None)), "pending": (dict, type(None))},
)
"""A run's checkpoint (``stream_cl.checkpointer``): what a restore, ``stream-cl checkpoint`` and an export read."""


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
        Newest checkpoints that load kept after each write (>= 1); see :meth:`prune`.
    sweep
        This store is the directory's writer: lock the directory (``DIR/.lock``, until :meth:`close` or
        the store is collected), then delete temp files a crash left mid-write. Only the process that
        writes checkpoints does (at its start): anyone else opening the directory (``stream-cl
        checkpoint ls``, an export) needs no lock, and must not sweep: that could delete the checkpoint
        a running service is writing.
    layout
        The keys a payload must have to load (None: any dict).

    Raises
    ------
    CheckpointDirInUseError
        With ``sweep``, if another open store (in this or another process) holds the directory's lock.

    Examples
    --------
    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2, layout=None)
    >>> [store.write({"n": torch.tensor(i)}).id for i in range(3)]
    [1, 2, 3]
    >>> [c.id for c in store.list()], int(store.latest()[1]["n"])
    ([2, 3], 2)
    """

    def __init__(
        self, directory: str | Path, *, keep: int = 3, sweep: bool = False, layout: Layout | None = RUN_LAYOUT
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.layout = layout
        self._valid: set[str] = set()  # names of files written or loaded here: files never change, so once is enough
        self._kept: set[str] = set()  # names of files prune found it must not delete, so it reads them once
        self.directory.mkdir(parents=True, exist_ok=True)
        self._unlock: Callable[[], object] = lambda: None
        if sweep:
            # closing the descriptor releases the lock, also when the store is dropped without close()
            self._unlock = weakref.finalize(self, os.close, _lock(self.directory))
            for stale in self.directory.glob(".ckpt-*.tmp"):
                stale.unlink(missing_ok=True)  # left by a crash mid-write; never renamed, so never valid

    def close(self) -> None:
        """Release the directory's lock (if this store holds it); reading and writing still work."""
        self._unlock()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list(self) -> list[CheckpointInfo]:
        """Checkpoints in the directory, oldest first."""
        out = []
        for path in self.directory.iterdir():
            match = _NAME.fullmatch(path.name)
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
        """Write ``payload`` (plus ``format``, ``id`` and ``created``) as the next checkpoint, then prune.

        Raises
        ------
        CheckpointError
            If ``payload`` lacks what :attr:`layout` requires (it could never be loaded).
        """
        problem = self.layout.problem(payload) if self.layout is not None else None
        if problem:
            raise CheckpointError(f"not written: the checkpoint payload is {problem}")
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
        self._valid.add(path.name)
        self.prune()  # best effort: the checkpoint is written whatever happens to older ones
        return CheckpointInfo(checkpoint_id, path, digest, len(data), time.time())

    def load(self, info: CheckpointInfo) -> dict[str, Any]:
        """The verified payload of ``info``.

        Raises
        ------
        CheckpointError
            If the bytes do not match the digest (truncated or corrupted), or the file is gone or a directory.
        CheckpointUnreadableError
            If reading the file fails otherwise (no permission, an I/O error).
        CheckpointFormatError
            If the bytes match the digest but do not load, have another format version, or lack a key (or a
            key's type) that the store or :attr:`layout` requires.
        """
        try:
            data = info.path.read_bytes()
        except (FileNotFoundError, IsADirectoryError) as err:  # pruned since the listing, or no checkpoint at all
            raise CheckpointError(f"{info.path.name}: {err}") from err
        except OSError as err:
            raise CheckpointUnreadableError(f"{info.path.name}: cannot read: {err}") from err
        if hashlib.sha256(data).hexdigest()[:16] != info.digest:
            raise CheckpointError(f"{info.path.name}: checksum mismatch (truncated or corrupted)")
        # The bytes are those written: whatever fails from here on, another version wrote them.
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for archives it cannot read
            raise CheckpointFormatError(f"{info.path.name}: cannot load: {err}") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            version = payload.get("format") if isinstance(payload, dict) else None
            raise CheckpointFormatError(f"{info.path.name}: format {version!r}, expected {FORMAT_VERSION}")
        for layout in (_STORE_KEYS, self.layout):
            problem = layout.problem(payload) if layout is not None else None
            if problem:
                raise CheckpointFormatError(f"{info.path.name}: unexpected layout: {problem}")
        self._valid.add(info.path.name)
        return payload

    def latest(self) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads; bad newer ones are logged and skipped.

        None only if the directory holds no checkpoint file.

        Raises
        ------
        CheckpointError
            If it holds checkpoint files but none loads: starting afresh would relearn everything (and the
            first write could prune them), so the newest one's problem is for a person to settle.
        """
        refused: list[CheckpointError] = []
        for info in reversed(self.list()):
            try:
                return info, self.load(info)
            except CheckpointError as err:
                log.warning("skipping checkpoint %d: %s", info.id, err)
                if info.path.is_file():  # not one pruned since the listing, nor a directory named like one
                    refused.append(err)
        if not refused:
            return None
        newest = refused[0]
        why = ""
        if isinstance(newest, CheckpointFormatError):
            why = " (written by another version of stream-cl)"
        elif isinstance(newest, CheckpointUnreadableError):
            why = " (check its permissions and the disk)"
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored ({len(refused)} found, none loads); the newest: "
            f"{newest}{why}. None is deleted; to start a new model instead, move them away or use another "
            "--checkpoint-dir"
        ) from newest

    def prune(self) -> None:
        """Delete what a restart can do without: every checkpoint older than the newest ``keep`` that load,
        and one that does not load once a newer one does (if none loads, nothing is deleted). Never deleted:
        a file another version wrote (:class:`CheckpointFormatError`; going back to that version needs it)
        or one that cannot be read (:class:`CheckpointUnreadableError`; it may be intact). Best effort: a
        file that cannot be deleted is logged and left, and the others are still pruned."""
        newer_valid = 0
        for info in reversed(self.list()):
            if self._loads(info):
                if newer_valid < self.keep:
                    newer_valid += 1
                    continue
            elif info.path.name in self._kept:
                continue
            if newer_valid:
                try:
                    info.path.unlink(missing_ok=True)
                except OSError as err:  # e.g. a directory named like a checkpoint
                    log.warning("cannot delete old checkpoint %s: %s", info.path.name, err)
                else:
                    self._valid.discard(info.path.name)

    def _loads(self, info: CheckpointInfo) -> bool:
        name = info.path.name
        if name in self._valid:
            return True
        if name in self._kept:
            return False
        try:
            self.load(info)
        except (CheckpointFormatError, CheckpointUnreadableError):
            self._kept.add(name)
            return False
        except CheckpointError:
            return False
        return True


def _lock(directory: Path) -> int:
    """A descriptor holding ``directory``'s exclusive lock, which names the holder's pid."""
    path = directory / _LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # no O_TRUNC: the holder's pid stays
    try:
        if not _try_lock(fd):
            gc.collect()  # a store this process dropped without close() holds it until the cycle collector runs
            if not _try_lock(fd):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise CheckpointDirInUseError(
                    f"checkpoint directory {directory} is locked by process {holder}, which writes checkpoints "
                    "there (one service per checkpoint directory): stop it first, or use another --checkpoint-dir"
                )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the entry lives in the directory's own data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
