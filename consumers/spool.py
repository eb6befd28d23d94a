"""A durable first-in, first-out queue of messages on local disk, shared by one writer and one reader thread.

Each message is one recorded-stream file (:mod:`consumers.recorded`'s format, stored uncompressed) named by
a sequence number, written under a temporary name and renamed into place, so a file that exists is
complete: a crash never leaves a half-written entry (an interrupted write leaves a ``.tmp`` file, removed on
the next open; its ``put`` never returned). Files are flushed to the OS, not fsynced: entries survive a
killed process, not a power cut. A new :class:`Spool` on the same directory picks up the entries left
there, oldest first. An exclusive lock file keeps two processes from sharing a directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import NamedTuple

from consumers.record import Message
from consumers.recorded import RecordedStreamError, read_messages, write_messages

log = logging.getLogger(__name__)

_SUFFIX = ".rec.gz"
_REJECTED_SUFFIX = ".rejected"


class Entry(NamedTuple):
    """One spooled message: its file and size on disk."""

    path: Path
    size: int


class Spool:
    """Messages waiting on disk, in the order they were put.

    ``max_bytes`` is a soft bound: :meth:`put` never refuses a message (that would lose it); :attr:`full`
    tells the producer side to stop adding more until the reader side has removed some.

    Raises
    ------
    RuntimeError
        If another open spool (in this or another process) holds ``directory``.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be > 0, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock_file = (self.directory / ".lock").open("wb")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self._lock_file.close()
            raise RuntimeError(f"spool directory {self.directory} is in use by another spool") from err
        self._mutex = threading.Lock()
        self._entries: deque[Entry] = deque()
        self.bytes = 0
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()
        for path in sorted(self.directory.glob("*" + _SUFFIX)):
            self._entries.append(Entry(path, path.stat().st_size))
            self.bytes += path.stat().st_size
        # numbers continue past the set-aside (.rejected) files too, so a later one never overwrites them
        numbers = [
            int(p.name.split(".", 1)[0]) for p in self.directory.glob("*" + _SUFFIX + "*") if p.name[0].isdigit()
        ]
        self._next = max(numbers, default=-1) + 1
        if self._entries:
            log.warning("spool %s: %d messages left by an earlier process", self.directory, len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def put(self, message: Message) -> None:
        """Append ``message``; it is on disk when this returns.

        Raises
        ------
        OSError
            If it cannot be written (disk full, file size limit, read-only); the spool is unchanged and no
            temporary file is left behind.
        """
        with self._mutex:
            seq, self._next = self._next, self._next + 1
        path = self.directory / f"{seq:012d}{_SUFFIX}"
        tmp = path.with_name(path.name + ".tmp")
        try:
            write_messages(tmp, [message], compresslevel=0)  # stored, not compressed: the writer is the learner
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk: give back what the half-written file took
            raise
        size = path.stat().st_size
        with self._mutex:
            self._entries.append(Entry(path, size))
            self.bytes += size

    def oldest(self, count: int) -> list[tuple[Entry, Message | None]]:
        """Up to ``count`` oldest entries with their messages (None for a file that cannot be read)."""
        with self._mutex:
            entries = [self._entries[i] for i in range(min(count, len(self._entries)))]
        return [(entry, _read(entry.path)) for entry in entries]

    def remove(self, count: int, *, keep_as_rejected: bool = False) -> None:
        """Remove the ``count`` oldest entries (delivered), or rename them ``*.rejected`` (kept for a person)."""
        for _ in range(count):
            with self._mutex:
                entry = self._entries.popleft()
                self.bytes -= entry.size
            if keep_as_rejected:
                entry.path.rename(entry.path.with_name(entry.path.name + _REJECTED_SUFFIX))
            else:
                entry.path.unlink()

    def close(self) -> None:
        """Release the directory; entries stay on disk for the next :class:`Spool` there."""
        self._lock_file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path) -> Message | None:
    try:
        messages = list(read_messages(path))
    except RecordedStreamError as err:
        log.error("spool entry %s cannot be read: %s", path, err)
        return None
    return messages[0] if len(messages) == 1 else None
