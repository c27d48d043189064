"""The engine's log lines, to stderr: plain text or JSON lines (one object per line, for a
service's journal or a log shipper), at the level in `[logging] level`. A runner logs each
session's start and end, step failures and retries, and each file the inbox takes or rejects,
with the job id."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FORMATS = ("plain", "json")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "plain", stream=None) -> None:
    """Send the engine's log records to stderr (or `stream`) in this format, replacing what an
    earlier call set up."""
    if fmt not in FORMATS:
        from engine.errors import ValidationError

        raise ValidationError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        from engine.errors import ValidationError

        raise ValidationError(f"[logging] level {level!r}: one of DEBUG, INFO, WARNING, ERROR")
    engine, everything = logging.getLogger("engine"), logging.getLogger()
    for logger in (engine, everything):
        for old in [h for h in logger.handlers if getattr(h, "engine_handler", False)]:
            logger.removeHandler(old)
    engine.addHandler(_handler(fmt, stream))
    engine.setLevel(numeric)
    engine.propagate = False
    # The libraries' warnings and errors (watchdog's, diffusers', torch's) in the same format: without
    # a handler of their own, Python prints them as bare text, which is no JSON line.
    everything.addHandler(_handler(fmt, stream, logging.WARNING))


def _handler(fmt: str, stream, level: int = logging.NOTSET) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    handler.engine_handler = True  # type: ignore[attr-defined]
    return handler
