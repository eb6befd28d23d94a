"""Recorded streams: one compressed, streamable file format for messages, and a source over it.

A file is gzip-compressed as a whole: an 8-byte header ``b"SCLREC\\x00"`` + format version byte, then one
frame per message. Writers write version 2; readers read versions 1 and 2.

* Version 2: ``<u32 body length><body>``, the body being the fixed fields ``<u32 partition><i64 offset>
  <f64 timestamp><u32 key length><u32 value length><u32 stream length><u32 header count><u8 flags>``, one
  ``<u32 name length><u32 value length>`` pair per header (u32 throughout: any message Kafka delivers
  fits), then the stream name (UTF-8), the key, the value and each header's name (UTF-8) and value. Key
  length ``0xFFFFFFFF`` is a null key; flag bit 0 says the timestamp's 8 bytes are an i64 (an integer
  timestamp), not an f64. All binary, little-endian: a frame is parsed with two ``struct`` unpacks and
  slices, no JSON or base64 (version 1 spent most of its read time there).
* Version 1: ``<u32 meta length><meta JSON><u32 key length><key><u32 value length><value>``; the meta JSON
  holds ``stream``, ``partition``, ``offset``, ``timestamp`` and ``headers`` (a list of ``[name, base64
  value]``).

Frames are parsed from 64 KiB chunks of the decompressed stream, so a file of any size streams in
constant memory. A file cut short or damaged (a length over :data:`MAX_FIELD_BYTES`, a version-2 frame
over three times that, a version-1 meta over :data:`MAX_META_BYTES`, more than :data:`MAX_HEADERS` headers,
lengths that do not add up, meta that is not the object above, headers that are not base64, a partition or
offset beyond Kafka's int32/int64, a stream or header name that is not UTF-8)
yields its complete frames before the damage, then raises :class:`RecordedStreamError`
naming the frame; nothing after it is trusted, since the framing is lost. The version byte is bumped on
any change old readers cannot read; readers reject other magic/version bytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import gzip
import io
import json
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from consumers.record import DeadLetter, Message, Poll, Position, Record
from consumers.source import Offsets, within_of
from consumers.wire import MAX_PAYLOAD_BYTES, decode_samples

log = logging.getLogger(__name__)

MAGIC = b"SCLREC\x00\x02"
"""The header of the files writers write (format version 2)."""
MAGIC_V1 = b"SCLREC\x00\x01"
"""The header of version-1 files (JSON frame meta), still read."""
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_FIXED = struct.Struct("<IqdIIIIB")
_INT_TIMESTAMP = 1
_PAIR_BYTES = 8  # a header's "<II" (name length, value length)
_NULL = 0xFFFFFFFF
_CHUNK = 1 << 16
MAX_FIELD_BYTES = 64 * 1024 * 1024
"""Longest meta, key or value a frame may declare: a longer one is damage, not data (Kafka's own limit is lower)."""
_MAX_BODY_BYTES = 3 * MAX_FIELD_BYTES
MAX_HEADERS = 65_536
"""Most headers a frame may declare: each costs a few hundred bytes of Python objects, so a frame of 24 million
empty headers (192 MiB that gzip packs into kilobytes) would take gigabytes; stream-cl's messages carry a few."""
MAX_META_BYTES = 4 * 1024 * 1024
"""Longest version-1 meta JSON: its headers become Python lists before they can be counted (version-1 files hold
wire-format-1 messages, whose headers are a few kilobytes)."""
_PARTITIONS = 2**31  # Kafka's partitions are int32: a larger one is damage, and no dead letter could name it
_OFFSETS = 2**63  # offsets (and integer timestamps) are int64, as the writer packs them
_CACHED_BYTES = 256
"""Longest stream or header name (and version-1 header value) remembered: the names that repeat are short, and a
cache of 4,096 long ones would hold gigabytes."""


class RecordedStreamError(ValueError):
    """The file is not a recorded stream, or is truncated or damaged mid-frame."""


def write_messages(path: str | Path, messages: Iterable[Message], *, compresslevel: int = 6) -> int:
    """Write messages to a recorded-stream file; returns how many were written.

    ``compresslevel`` is gzip's (0 stores without compressing: fastest to write, same format).
    """
    count = 0
    with gzip.open(path, "wb", compresslevel=compresslevel) as out:
        out.write(MAGIC)
        for message in messages:
            _write_frame(out, message)
            count += 1
    return count


class RecordedWriter:
    """Append messages to a new recorded-stream file one at a time (for ``stream-cl record``)."""

    def __init__(self, path: str | Path) -> None:
        self._file = gzip.open(path, "wb", compresslevel=6)  # noqa: SIM115 - closed by close()/__exit__
        self._file.write(MAGIC)
        self.count = 0

    def write(self, message: Message) -> None:
        _write_frame(self._file, message)
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.close()
        except OSError:
            if exc_type is None:
                raise
            # closing after a failed write (a full disk) fails again: the first error is the one to report


class DurableRecordedWriter:
    """Append messages to a recorded-stream file, each as a gzip member of its own (gzip readers read
    concatenated members as one stream), written with unbuffered appends.

    The file reads whole after a kill at any moment (a kill, not a power cut: nothing is fsynced), and a write
    the disk refuses (full, file size limit) is cut back off before :meth:`write` raises its :class:`OSError`:
    the file keeps every message before it, and the same message may be written again later. An existing
    recorded stream is appended to, so a restarted service keeps what it wrote before: a member torn by a
    kill mid-write at its end is cut off first; a file damaged elsewhere is moved aside, whole, to
    ``PATH.damaged-SECONDS``, and a new file begins. A file emptied from outside while it is written
    (logrotate's ``copytruncate``) gets its header again with the next message. :attr:`count` counts this
    writer's messages. A member per message compresses less than :class:`RecordedWriter`'s one stream; it is
    meant for rare messages that must not be lost (dead letters).

    Raises
    ------
    RecordedStreamError
        If the file exists, is not empty and is not a version-2 recorded stream (it is left as it is).
    OSError
        If the file cannot be opened, or created with its header.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        whole = _kept_bytes(self.path) if self.path.is_file() else 0  # not /dev/null or a pipe
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()/__exit__
        try:
            size = self._size()
            if whole < size:
                log.warning("%s: cutting off the %d bytes of a member torn by a kill", self.path, size - whole)
                self._file.truncate(whole)
            if not whole:
                self._append(b"")
        except OSError:
            self._file.close()
            raise

    def write(self, message: Message) -> None:
        frame = io.BytesIO()
        _write_frame(frame, message)
        self._append(frame.getvalue())
        self.count += 1

    def _size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def _append(self, frame: bytes) -> None:
        start = self._size()  # appends land at the end, wherever an outside truncation left it
        header = gzip.compress(MAGIC, mtime=0) if start == 0 else b""
        data = memoryview(header + (gzip.compress(frame, compresslevel=6, mtime=0) if frame else b""))
        try:
            while data:  # an unbuffered write may take part of the bytes
                data = data[self._file.write(data) :]
        except OSError:
            with contextlib.suppress(OSError):  # truncating frees space: it does not fail for a full disk
                self._file.truncate(start)
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DurableRecordedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kept_bytes(path: Path) -> int:
    """How many leading bytes of the recorded stream ``path`` an appending writer keeps: all of them, but for a
    member torn by a kill at the end. A file damaged elsewhere is moved aside (0 are kept of the new one).

    Raises
    ------
    RecordedStreamError
        If the file is not empty and does not start as a version-2 recorded stream.
    """
    whole = at = 0
    head = b""
    member = zlib.decompressobj(wbits=31)
    with path.open("rb") as f:
        data = f.read(_CHUNK)
        while data:
            try:
                out = member.decompress(data, _CHUNK)  # bounded output: a small file may unpack to gigabytes
            except zlib.error as err:
                if len(head) < len(MAGIC):  # gzip, but not a stream of ours
                    raise RecordedStreamError(f"{path}: not a stream-cl recorded stream: not appended to") from err
                aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
                log.error("%s: damaged after byte %d (%s); moved to %s, a new file begins", path, whole, err, aside)
                path.rename(aside)
                return 0
            head += out[: len(MAGIC) - len(head)]
            if head != MAGIC[: len(head)] or (member.eof and head != MAGIC):  # version 1 is not appended to either
                raise RecordedStreamError(f"{path}: not a version-2 stream-cl recorded stream: not appended to")
            rest = member.unused_data if member.eof else member.unconsumed_tail
            at += len(data) - len(rest)
            if member.eof:
                whole, member = at, zlib.decompressobj(wbits=31)
            data = rest or f.read(_CHUNK)
    return whole


def read_messages(path: str | Path, raw: BinaryIO | None = None) -> Iterator[Message]:
    """Stream the messages of a recorded-stream file in order (from ``raw``, the opened file, if given)."""
    try:
        with gzip.GzipFile(filename=None if raw else path, fileobj=raw, mode="rb") as src:
            read_frame = _READERS.get(src.read(len(MAGIC)))
            if read_frame is None:
                raise RecordedStreamError(f"{path}: not a stream-cl recorded stream (bad magic or unknown version)")
            frames = _Chunks(src, path)
            index = 0
            while frames.more():
                start = frames.taken
                try:
                    message = read_frame(frames)
                except _BadFrame as err:
                    raise RecordedStreamError(f"{path}: frame {index} (byte {start} unpacked): {err}") from err
                yield message
                index += 1
    except (OSError, EOFError) as err:
        raise RecordedStreamError(f"{path}: {err}") from err


class RecordedSource:
    """A :class:`~consumers.source.Source` over a recorded-stream file (file → learner, no Kafka).

    Positions are those stored in the file. ``commit`` remembers how far the consumer got;
    ``start_offsets`` skips what an earlier run already committed, so resuming works as with Kafka
    (as :class:`~consumers.source.NextOffsets`, also the samples already learned of a partly learned
    message). A message of several samples may be handed over across polls: each poll returns at most
    ``max_records`` samples.
    """

    poll_timeout_s = 0.0  # the data is on disk: never wait for more
    fetches_ahead = False

    def __init__(
        self,
        path: str | Path,
        *,
        start_offsets: Offsets | None = None,
        max_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"recorded stream not found: {self.path}")
        self._start = dict(start_offsets or {})
        self._within = within_of(start_offsets or {})
        self._held: deque[Record | DeadLetter] = deque()  # samples of a message that did not fit the last poll
        self._max_bytes = max_bytes
        self._size = max(self.path.stat().st_size, 1)
        self._raw: BinaryIO | None = None
        self._messages = self._read()
        self.committed: dict[tuple[str, int], int] = dict(self._start)
        self.exhausted = False
        self._error: RecordedStreamError | None = None

    def poll(self, timeout_s: float = 0.0, max_records: int = 10) -> Poll:
        """The next records and dead letters; a damaged file's error comes after the frames before the damage."""
        if self._error is not None:
            raise self._error
        poll = Poll()
        records, dead_letters, held = poll.records, poll.dead_letters, self._held
        count = 0
        while held and count < max_records:
            _add(poll, held.popleft())
            count += 1
        while count < max_records:
            try:
                message = next(self._messages, None)
            except RecordedStreamError as err:
                self._error = err  # raised from now on; first by the next poll if this one has records
                if not count:
                    raise
                break
            if message is None:
                self.exhausted = True
                break
            pos = message.position
            key = (pos.stream, pos.partition)
            start = self._start.get(key, 0)
            if pos.offset < start:
                continue
            decoded = decode_samples(message, self._max_bytes)
            if pos.offset == start and key in self._within:  # samples an earlier run learned already
                decoded = decoded[self._within.pop(key) :]
            if len(decoded) == 1:  # the common message of one sample
                entry = decoded[0]
                (records if type(entry) is Record else dead_letters).append(entry)
                count += 1
                continue
            room = max_records - count
            for entry in decoded[:room]:
                _add(poll, entry)
            count += min(room, len(decoded))
            held.extend(decoded[room:])
        return poll

    def _read(self) -> Iterator[Message]:
        # the generator owns the open file: closing it (or collecting it) closes the file
        with self.path.open("rb") as raw:
            self._raw = raw
            yield from read_messages(self.path, raw)

    @property
    def fraction_read(self) -> float:
        """Share of the file's (compressed) bytes read so far: what a progress bar's estimate needs."""
        raw = self._raw
        return 1.0 if self.exhausted else 0.0 if raw is None or raw.closed else raw.tell() / self._size

    def commit(self, offsets: Offsets) -> None:
        self.committed.update(offsets)

    def close(self) -> None:
        self._messages.close()

    def __enter__(self) -> RecordedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add(poll: Poll, entry: Record | DeadLetter) -> None:
    (poll.records if isinstance(entry, Record) else poll.dead_letters).append(entry)


def _write_frame(out: BinaryIO, message: Message) -> None:
    """One version-2 frame."""
    position, key, timestamp = message.position, message.key, message.timestamp
    stream = position.stream.encode()
    headers = [(name.encode(), value) for name, value in message.headers]
    integer = type(timestamp) is int  # kept an int on reading, as version 1's JSON kept it
    fixed = _FIXED.pack(
        position.partition,
        position.offset,
        0.0 if integer else timestamp,
        _NULL if key is None else len(key),
        len(message.value),
        len(stream),
        len(headers),
        _INT_TIMESTAMP if integer else 0,
    )
    if integer:
        fixed = fixed[:12] + _I64.pack(timestamp) + fixed[20:]
    lengths = _lengths(len(headers)).pack(*(n for name, value in headers for n in (len(name), len(value))))
    parts = [fixed, lengths, stream, key or b"", message.value, *(b for header in headers for b in header)]
    body = b"".join(parts)
    out.write(_U32.pack(len(body)) + body)


class _Chunks:
    """The decompressed stream read in large chunks: one gzip read per 64 KiB, not four per frame."""

    def __init__(self, src: gzip.GzipFile, path: str | Path) -> None:
        self._src, self._path = src, path
        self._buf, self._pos = b"", 0
        self.taken = 0

    def more(self) -> bool:
        return self._pos < len(self._buf) or self._fill(1)

    def span(self, n: int) -> tuple[bytes, int]:
        """The buffer and the start of the next ``n`` bytes in it, taken without copying them out."""
        if self._pos + n > len(self._buf) and not self._fill(n):
            raise RecordedStreamError(f"{self._path}: truncated frame")
        start = self._pos
        self._pos += n
        self.taken += n
        return self._buf, start

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf) and not self._fill(n):
            raise RecordedStreamError(f"{self._path}: truncated frame")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.taken += n
        return out

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def field(self, name: str, *, nullable: bool = False, most: int = MAX_FIELD_BYTES) -> bytes | None:
        """A length-prefixed field of at most ``most`` bytes; ``None`` for the null length where ``nullable``."""
        length = self.u32()
        if nullable and length == _NULL:
            return None
        if length > most:
            raise _BadFrame(f"{name} length {length} > {most}")
        return self.take(length)

    def _fill(self, n: int) -> bool:
        """Make ``n`` bytes available from the current position; False at end of file."""
        parts, have = [self._buf[self._pos :]], len(self._buf) - self._pos
        while have < n:
            # read1: a truncated file still gives up what it decompressed before the gzip stream ends
            chunk = self._src.read1(max(_CHUNK, n - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self._buf, self._pos = b"".join(parts), 0
        return have >= n


class _BadFrame(ValueError):
    """A frame whose lengths or meta are not what the writer writes."""


def _read_frame_v2(frames: _Chunks) -> Message:
    buf, start = frames.span(4)
    (size,) = _U32.unpack_from(buf, start)
    if size > _MAX_BODY_BYTES or size < _FIXED.size:
        raise _BadFrame(f"body length {size} outside {_FIXED.size}..{_MAX_BODY_BYTES}")
    buf, at = frames.span(size)  # may move the bytes to a new buffer: positions count from here
    end = at + size
    partition, offset, timestamp, key_len, value_len, stream_len, n_headers, flags = _FIXED.unpack_from(buf, at)
    at += _FIXED.size
    if n_headers > MAX_HEADERS:  # before the header lengths are unpacked into a tuple of twice as many ints
        raise _BadFrame(f"header count {n_headers} > {MAX_HEADERS}")
    declared = at + _PAIR_BYTES * n_headers + stream_len + (0 if key_len == _NULL else key_len) + value_len
    if declared > end:  # checked before the header lengths are read: they may lie past the body
        raise _BadFrame(f"fields of {declared - at + _FIXED.size} bytes in a body of {size}")
    lengths = _lengths(n_headers)
    if flags & _INT_TIMESTAMP:
        (timestamp,) = _I64.unpack_from(buf, at - _FIXED.size + 12)
    sizes = lengths.unpack_from(buf, at)
    if declared + sum(sizes) != end or offset < 0:
        raise _BadFrame(f"fields of {declared + sum(sizes) - at + _FIXED.size} bytes in a body of {size}")
    if partition >= _PARTITIONS:
        raise _BadFrame(f"partition {partition} is not an int32")
    at += lengths.size
    try:
        stream = _utf8(buf[at : at + stream_len])
        at += stream_len
        key = None
        if key_len != _NULL:
            key, at = buf[at : at + key_len], at + key_len
        value, at = buf[at : at + value_len], at + value_len
        headers = []
        for i in range(0, 2 * n_headers, 2):
            name_end = at + sizes[i]
            value_end = name_end + sizes[i + 1]
            headers.append((_utf8(buf[at:name_end]), buf[name_end:value_end]))
            at = value_end
    except UnicodeDecodeError as err:
        raise _BadFrame(f"a stream or header name is not UTF-8 ({err})") from err
    return Message(Position(stream, partition, offset), timestamp, key, value, tuple(headers))


@functools.lru_cache(maxsize=64)
def _lengths(n_headers: int) -> struct.Struct:
    """The (name length, value length) pairs of ``n_headers`` headers."""
    return struct.Struct("<" + "II" * n_headers)


def _utf8(raw: bytes) -> str:
    """Stream and header names repeat from frame to frame: decode each short one once."""
    return _cached_utf8(raw) if len(raw) <= _CACHED_BYTES else raw.decode()


@functools.lru_cache(maxsize=4096)
def _cached_utf8(raw: bytes) -> str:
    return raw.decode()


def _read_frame_v1(frames: _Chunks) -> Message:
    raw_meta = frames.field("meta", most=MAX_META_BYTES)
    key = frames.field("key", nullable=True)
    value = frames.field("value")
    try:
        meta = json.loads(raw_meta)  # type: ignore[arg-type]
        headers = tuple(
            (k, base64.b64decode(v, validate=True) if k == "id" else _header_value(v)) for k, v in meta["headers"]
        )
        position = Position(meta["stream"], meta["partition"], meta["offset"])
        timestamp = meta["timestamp"]
    except (ValueError, TypeError, KeyError, RecursionError, binascii.Error) as err:
        raise _BadFrame(f"meta is not a frame's meta ({type(err).__name__}: {str(err)[:100]})") from err
    if len(headers) > MAX_HEADERS:
        raise _BadFrame(f"header count {len(headers)} > {MAX_HEADERS}")
    if not (
        isinstance(position.stream, str)
        and type(position.partition) is int
        and type(position.offset) is int
        and 0 <= position.partition < _PARTITIONS
        and 0 <= position.offset < _OFFSETS
        and (type(timestamp) is float or (type(timestamp) is int and -_OFFSETS <= timestamp < _OFFSETS))
        and all(isinstance(k, str) for k, _ in headers)
    ):
        raise _BadFrame(f"meta has fields of the wrong types or out of range: {str(meta)[:100]}")
    # JSON escapes can spell lone surrogates, which no dead letter or version-2 frame can carry
    if not all(map(_encodable, (position.stream, *(k for k, _ in headers)))):
        raise _BadFrame("a stream or header name is not encodable as UTF-8 (lone surrogate)")
    return Message(position, timestamp, key, value, headers)  # type: ignore[arg-type]


def _header_value(encoded: str) -> bytes:
    """Header values repeat from frame to frame (dtype, shape, labels; not ids): decode each short one once."""
    return _cached_header_value(encoded) if len(encoded) <= _CACHED_BYTES else base64.b64decode(encoded, validate=True)


@functools.lru_cache(maxsize=4096)
def _cached_header_value(encoded: str) -> bytes:
    return base64.b64decode(encoded, validate=True)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_READERS = {MAGIC: _read_frame_v2, MAGIC_V1: _read_frame_v1}
