from __future__ import annotations

import base64
import gzip
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from consumers.dlq import dead_letter_message
from consumers.record import DeadLetter, Message, Position, Record
from consumers.recorded import (
    MAGIC,
    MAGIC_V1,
    RecordedSource,
    RecordedStreamError,
    RecordedWriter,
    read_messages,
    write_messages,
)
from consumers.spool import Spool
from tests.consumers.streams import bad_messages, good_messages


def _sample() -> list[Message]:
    return [
        Message(Position("a", 0, 0), 1.25, None, b"", ()),
        Message(Position("a", 3, 17), 2.5, b"key", b"\x00\xff" * 50, (("h", b"\x00\x01"), ("h", b""), ("u", b"v"))),
        Message(Position("é/" * 40_000, 1, 2), 3.5, b"", b"v", (("n" * 70_000, b"long name"), ("ü", b"\xff"))),
        *good_messages(5),
    ]


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "s.rec.gz"
    assert write_messages(path, _sample()) == 8
    assert list(read_messages(path)) == _sample()
    with RecordedWriter(tmp_path / "w.rec.gz") as writer:
        for m in _sample():
            writer.write(m)
    assert list(read_messages(tmp_path / "w.rec.gz")) == _sample()
    assert gzip.decompress(path.read_bytes()).startswith(MAGIC) and MAGIC != MAGIC_V1


def test_integer_and_float_timestamps_keep_their_type(tmp_path: Path) -> None:
    path = tmp_path / "t.rec.gz"
    stamps = [1_700_000_000_123, 2.5, 0, -3, 1e300]
    write_messages(path, [Message(Position("a", 0, i), t, None, b"v") for i, t in enumerate(stamps)])
    read = [m.timestamp for m in read_messages(path)]
    assert read == stamps and [type(t) for t in read] == [type(t) for t in stamps]


def _v1_frame(message: Message) -> bytes:
    """A frame as version-1 writers wrote it (JSON meta, base64 header values)."""
    meta = json.dumps(
        {
            "stream": message.position.stream,
            "partition": message.position.partition,
            "offset": message.position.offset,
            "timestamp": message.timestamp,
            "headers": [[k, base64.b64encode(v).decode()] for k, v in message.headers],
        }
    ).encode()
    return _frame(meta, message.key, message.value)


def _v1_file(path: Path, messages: list[Message], damage: bytes = b"", at: int = 0) -> Path:
    frames = [_v1_frame(m) for m in messages]
    path.write_bytes(gzip.compress(MAGIC_V1 + b"".join(frames[:at]) + damage + b"".join(frames[at:])))
    return path


def test_version_1_files_still_read(tmp_path: Path) -> None:
    path = _v1_file(tmp_path / "v1.rec.gz", _sample())
    assert list(read_messages(path)) == _sample()
    with RecordedSource(path) as source:
        assert [r.id for r in source.poll(0, 10).records] == [f"good-{i}" for i in range(5)]
    shipped = Path(__file__).parents[2] / "consumers" / "data" / "fashion_mnist_ci.rec.gz"
    with gzip.open(shipped) as raw:
        assert raw.read(len(MAGIC_V1)) == MAGIC_V1  # the stream that ships with the package is a version-1 file
    with RecordedSource(shipped) as source:
        poll = source.poll(0, 50)
        assert len(poll.records) == 50 and not poll.dead_letters


def test_an_unknown_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v9.rec.gz"
    path.write_bytes(gzip.compress(MAGIC[:-1] + b"\x09" + gzip.decompress(_written(tmp_path, _sample()))[8:]))
    with pytest.raises(RecordedStreamError, match="unknown version"):
        list(read_messages(path))


def _written(tmp_path: Path, messages: list[Message]) -> bytes:
    path = tmp_path / "written.rec.gz"
    write_messages(path, messages)
    return path.read_bytes()


def test_truncated_file_raises_after_the_complete_frames(tmp_path: Path) -> None:
    path = tmp_path / "s.rec.gz"
    write_messages(path, _sample())
    raw = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.rec.gz"
    cut.write_bytes(gzip.compress(raw[:-10]))
    messages = read_messages(cut)
    # streaming: the complete frames come out one by one before the damaged one is reached
    assert [next(messages) for _ in range(7)] == _sample()[:7]
    with pytest.raises(RecordedStreamError, match="truncated"):
        next(messages)
    half_gzip = tmp_path / "half.rec.gz"
    half_gzip.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(RecordedStreamError):
        list(read_messages(half_gzip))


def test_a_cut_gzip_still_yields_every_frame_it_can_decompress(tmp_path: Path) -> None:
    path = tmp_path / "big.rec.gz"
    rng = np.random.default_rng(0)
    frames = [
        Message(Position("t", 0, i), float(i), None, rng.bytes(512), (("id", f"r{i}".encode()),)) for i in range(2000)
    ]
    write_messages(path, frames)
    data = path.read_bytes()
    cut = tmp_path / "cut.rec.gz"
    cut.write_bytes(data[: len(data) * 3 // 10])  # a writer killed mid-file: no gzip trailer, a partial block
    readable = zlib.decompressobj(wbits=31).decompress(cut.read_bytes())
    complete, end = 0, len(MAGIC)  # frames wholly inside the decompressible prefix
    while end + 4 <= len(readable):  # each frame: a u32 body length, then the body
        (length,) = struct.unpack_from("<I", readable, end)
        end += 4 + length
        if end > len(readable):
            break
        complete += 1
    got = []
    with pytest.raises(RecordedStreamError):
        for message in read_messages(cut):
            got.append(message)
    assert complete > 500 and got == frames[:complete]


def test_not_a_recorded_stream(tmp_path: Path) -> None:
    other = tmp_path / "x.gz"
    other.write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(RecordedStreamError, match="magic"):
        list(read_messages(other))
    plain = tmp_path / "y"
    plain.write_bytes(b"not gzip at all")
    with pytest.raises(RecordedStreamError):
        list(read_messages(plain))


def test_source_decodes_streams_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "s.rec.gz"
    good = good_messages(6)
    bad = bad_messages()["bad_json"]
    write_messages(path, [*good[:3], Message(Position("src", 0, 3), 3.0, bad.key, bad.value), *good[4:]])
    with RecordedSource(path) as source:
        first = source.poll(0, 4)
        assert [r.id for r in first.records] == ["good-0", "good-1", "good-2"]
        assert [d.reason for d in first.dead_letters] == ["bad_json"]
        source.commit({("src", 0): 4})
        rest = source.poll(0, 10)
        assert [r.position.offset for r in rest.records] == [4, 5] and source.exhausted
    with RecordedSource(path, start_offsets={("src", 0): 5}) as resumed:
        assert [r.id for r in resumed.poll(0, 10).records] == ["good-5"]
    assert all(isinstance(r, Record) for r in first.records)


def _frame(meta: bytes, key: bytes | None = b"k", value: bytes = b"v", value_len: int | None = None) -> bytes:
    u32 = struct.Struct("<I").pack
    key_part = u32(0xFFFFFFFF) if key is None else u32(len(key)) + key
    return u32(len(meta)) + meta + key_part + u32(len(value) if value_len is None else value_len) + value


_META = b'{"stream":"src","partition":0,"offset":9,"timestamp":1.0,"headers":[]}'


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (_frame(b"not json"), "JSONDecodeError"),
        (_frame(b'{"stream":"src"}'), "KeyError"),
        (_frame(b"[" * 100_000), "RecursionError"),
        (_frame(_META.replace(b'"offset":9', b'"offset":"9"')), "wrong types"),
        (_frame(_META.replace(b'"partition":0', b'"partition":-1')), "wrong types"),
        (_frame(_META.replace(b'"timestamp":1.0', b'"timestamp":true')), "wrong types"),
        (_frame(_META.replace(b'"headers":[]', b'"headers":[["h","*not base64*"]]')), "Error"),
        (_frame(_META.replace(b'"headers":[]', b'"headers":[["id","@@"]]')), "Error"),
        (_frame(_META.replace(b'"headers":[]', b'"headers":[[1,"AA=="]]')), "wrong types"),
        (_frame(_META.replace(b'"headers":[]', b'"headers":[["a"]]')), "ValueError"),
        # beyond what Kafka, a dead letter or a version-2 frame can hold (an int32 partition, int64 offsets)
        (_frame(_META.replace(b'"partition":0', b'"partition":2147483648')), "out of range"),
        (_frame(_META.replace(b'"partition":0', b'"partition":4294967296')), "out of range"),
        (_frame(_META.replace(b'"offset":9', b'"offset":9223372036854775808')), "out of range"),
        (_frame(_META.replace(b'"timestamp":1.0', b'"timestamp":9223372036854775808')), "out of range"),
        (_frame(_META.replace(b'"stream":"src"', b'"stream":"\\ud800"')), "lone surrogate"),
        (_frame(_META.replace(b'"headers":[]', b'"headers":[["\\udfff","AA=="]]')), "lone surrogate"),
        (_frame(_META, value=b"", value_len=0xFFFFFFF0), "value length"),
        (struct.pack("<I", 0xFFFFFFFF) + b"x" * 20, "meta length"),
    ],
)
def test_a_damaged_version_1_frame_is_a_clear_error_after_the_frames_before_it(
    tmp_path: Path, frame: bytes, says: str
) -> None:
    good = good_messages(5)
    damaged = _v1_file(tmp_path / "damaged.rec.gz", good, frame, 3)
    before = sum(len(_v1_frame(m)) for m in good[:3])
    _damage_is_reported(damaged, before, says)


def _v2_body(
    stream: bytes = b"src",
    headers: tuple = ((b"h", b"v"),),
    offset: int = 9,
    lie: int = 0,
    count: int | None = None,
    partition: int = 0,
) -> bytes:
    n_headers = len(headers) if count is None else count
    fixed = struct.pack("<IqdIIIIB", partition, offset, 1.0, 0xFFFFFFFF, 1, len(stream), n_headers, 0)
    lengths = b"".join(struct.pack("<II", len(k), len(v)) for k, v in headers)
    body = fixed + lengths + stream + b"x" + b"".join(k + v for k, v in headers)
    return struct.pack("<I", len(body) + lie) + body


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (_v2_body(lie=-1), "fields of"),  # the declared lengths run past the body
        (_v2_body(lie=1) + b"?", "fields of"),  # the body has a byte no field accounts for
        (_v2_body(headers=((b"h" * 40, b"v"),), lie=-47), "fields of"),  # the header table runs past the body
        (_v2_body(offset=-1), "fields of"),
        (_v2_body(count=0xFFFFFFFF), "header count"),  # a header count the body has no room for
        (_v2_body(stream=b"\xff\xfe"), "not UTF-8"),
        (_v2_body(headers=((b"\xc3", b""),)), "not UTF-8"),
        (_v2_body(headers=((b"\xed\xa0\x80", b""),)), "not UTF-8"),  # a surrogate spelled in UTF-8
        (_v2_body(partition=2**31), "not an int32"),
        (_v2_body(partition=2**32 - 1), "not an int32"),
        (struct.pack("<I", 7) + b"x" * 7, "body length"),
        (struct.pack("<I", 0xFFFFFFF0) + b"x" * 20, "body length"),
    ],
)
def test_a_damaged_frame_is_a_clear_error_after_the_frames_before_it(tmp_path: Path, frame: bytes, says: str) -> None:
    good = good_messages(5)
    path = tmp_path / "ok.rec.gz"
    write_messages(path, good[:3])
    damaged = tmp_path / "damaged.rec.gz"
    ok = gzip.decompress(path.read_bytes())
    write_messages(path, good[3:])
    damaged.write_bytes(gzip.compress(ok + frame + gzip.decompress(path.read_bytes())[len(MAGIC) :]))
    _damage_is_reported(damaged, len(ok) - len(MAGIC), says)


def test_a_good_hand_built_version_2_frame_reads(tmp_path: Path) -> None:
    path = tmp_path / "one.rec.gz"
    path.write_bytes(gzip.compress(MAGIC + _v2_body()))
    assert list(read_messages(path)) == [Message(Position("src", 0, 9), 1.0, None, b"x", (("h", b"v"),))]


def _damage_is_reported(damaged: Path, byte: int, says: str) -> None:
    with pytest.raises(RecordedStreamError, match=rf"frame 3 \(byte {byte} unpacked\): .*{says}"):
        list(read_messages(damaged))
    with RecordedSource(damaged) as source:
        first = source.poll(0, 10)  # the frames before the damage are delivered (and learned) first
        assert [r.id for r in first.records] == ["good-0", "good-1", "good-2"] and not first.dead_letters
        with pytest.raises(RecordedStreamError, match="frame 3"):
            source.poll(0, 10)
        with pytest.raises(RecordedStreamError, match="frame 3"):
            source.poll(0, 10)  # and it stays an error
    with RecordedSource(damaged, start_offsets={("src", 0): 3}) as resumed:  # the damage is the first thing polled
        for _ in range(2):
            with pytest.raises(RecordedStreamError, match="frame 3"):
                resumed.poll(0, 10)


def test_the_largest_partition_and_offset_read_and_their_dead_letters_spool(tmp_path: Path) -> None:
    edge = Message(Position("src", 2**31 - 1, 2**63 - 1), 2**63 - 1, None, b"{", (("h", b"v"),))
    v1 = _v1_file(tmp_path / "v1.rec.gz", [edge])
    v2 = tmp_path / "v2.rec.gz"
    write_messages(v2, [edge])
    assert list(read_messages(v1)) == list(read_messages(v2)) == [edge]
    with Spool(tmp_path / "spool", 1 << 20) as spool:
        spool.put(dead_letter_message(DeadLetter(edge, "bad_json")))
        [(_, stored)] = spool.oldest(1)
    assert stored is not None and stored.position == edge.position


def _peak_while_reading(path: Path) -> int:
    """Peak bytes allocated while reading every frame of ``path`` (one frame held at a time)."""
    tracemalloc.start()
    try:
        for message in read_messages(path):
            del message
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_long_names_and_header_values_are_not_cached(tmp_path: Path) -> None:
    """30 frames of distinct 2 MiB header names (stream names; version-1 header values) once stayed in the
    decoding caches: 120 MiB and more, 4,096 of them hundreds of GiB."""
    big = 2 * 1024 * 1024
    names = [Message(Position("src", 0, i), 0.0, None, b"", ((f"{i:02}" + "n" * big, b"v"),)) for i in range(30)]
    streams = [Message(Position(f"{i:02}" + "s" * big, 0, i), 0.0, None, b"") for i in range(30)]
    values = [Message(Position("src", 0, i), 0.0, None, b"", (("h", b"%02d" % i + b"v" * big),)) for i in range(30)]
    for name, messages in (("names", names), ("streams", streams)):
        write_messages(tmp_path / f"{name}.rec.gz", messages, compresslevel=1)
        assert _peak_while_reading(tmp_path / f"{name}.rec.gz") < 24 * big, name
    assert _peak_while_reading(_v1_file(tmp_path / "values.rec.gz", values)) < 24 * big
