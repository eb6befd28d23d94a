"""Log lines: each record, newline included, reaches stderr in one write."""

from __future__ import annotations

import io
import json
import logging

from stream_cl.logs import JsonFormatter, TqdmHandler


class Writes(io.StringIO):
    """A stderr that keeps each write call apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        if text:
            self.calls.append(text)
        return super().write(text)


def test_a_record_is_one_write_so_workers_sharing_stderr_cannot_split_a_line(monkeypatch) -> None:
    stderr = Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    handler = TqdmHandler()
    handler.setFormatter(JsonFormatter())
    for n in range(3):
        handler.emit(logging.LogRecord("stream_cl.test", logging.INFO, __file__, 1, "line %d", (n,), None))
    assert len(stderr.calls) == 3 and all(call.endswith("\n") and call.count("\n") == 1 for call in stderr.calls)
    assert [json.loads(call)["message"] for call in stderr.calls] == ["line 0", "line 1", "line 2"]
