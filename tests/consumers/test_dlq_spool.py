"""The on-disk spool behind the Kafka dead-letter sink (no broker needed)."""

from __future__ import annotations

import pytest

from consumers.record import Message, Position
from consumers.spool import Spool


def _message(offset: int) -> Message:
    return Message(Position("t", 0, offset), 0.0, None, b"v%d" % offset)


def test_entries_come_back_in_order_and_survive_a_new_spool(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        for offset in range(4):
            spool.put(_message(offset))
        spool.remove(1)
    (tmp_path / "000000000009.rec.gz.tmp").write_bytes(b"half written")

    with Spool(tmp_path, max_bytes=1 << 20) as again:
        assert [m.position.offset for _, m in again.oldest(10)] == [1, 2, 3]
        again.put(_message(4))
        assert [m.position.offset for _, m in again.oldest(10)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_bound_is_reported_never_enforced(tmp_path):
    with Spool(tmp_path, max_bytes=1) as spool:
        spool.put(_message(0))
        spool.put(_message(1))
        assert spool.full and len(spool) == 2
        spool.remove(2)
        assert not spool.full and spool.bytes == 0


def test_unreadable_entry_is_reported_and_kept_aside(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.put(_message(0))
        ((entry, _),) = spool.oldest(1)
        entry.path.write_bytes(b"not a recorded stream")
        assert spool.oldest(1) == [(entry, None)]
        spool.remove(1, keep_as_rejected=True)
        assert len(spool) == 0
    assert [p.name for p in tmp_path.glob("*.rejected")] == [entry.path.name + ".rejected"]


def test_one_directory_one_spool(tmp_path):
    with Spool(tmp_path, max_bytes=1), pytest.raises(RuntimeError, match="in use"):
        Spool(tmp_path, max_bytes=1)
    Spool(tmp_path, max_bytes=1).close()
