"""Logging set-up for the command line: text for people, one JSON object per line for log collectors.

Structured fields passed with ``extra=`` (such as a drift event) become keys of the JSON object.
Log lines are written through tqdm, so they never break into a progress bar.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from tqdm import tqdm

FORMATS = ("text", "json")
QUIET_LOGGERS = ("kafka",)
"""Libraries whose own log is silenced unless debug logging is asked for: kafka-python logs every refused
connection and retry (about 20 lines for one wrong broker address), while stream-cl reports the failure
once, in its own words (a one-line error, or a warning while it retries)."""
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...extra fields}``, one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a progress bar on the same terminal is redrawn below the line.

    A record and its newline go out in one write (``tqdm.write`` would make two): the workers of
    ``serve --workers N`` share stderr, and a line split between writes could be interleaved with
    another worker's, breaking both (a JSON log line among them).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record) + "\n", file=sys.stderr, end="")
        except Exception:  # logging must never take the service down
            self.handleError(record)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging at ``level`` in ``fmt``; :data:`QUIET_LOGGERS` are silenced unless ``level`` is DEBUG."""
    handler = TqdmHandler()
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    if not root.handlers:  # like logging.basicConfig: a host (or pytest) that set up logging keeps its handlers
        root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
