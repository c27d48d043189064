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
# Control characters (a newline in a file name, a NUL, a terminal's escape) written as escapes, so
# that one record is one line and no name can forge another line or drive the terminal.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f, *range(0x80, 0xa0)) if code != ord("\t")}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r"})


def one_line(text: str) -> str:
    """`text` with every control character escaped (`\\n`, `\\x00`, `\\x1b`...)."""
    return text.translate(_CONTROLS)


class PlainLines(logging.Formatter):
    """`time LEVEL logger: message`, the message on one line; a traceback follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        shown = logging.makeLogRecord(record.__dict__)
        shown.message = one_line(record.message)
        return super().formatMessage(shown)


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": one_line(record.getMessage()),
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
    handler.setFormatter(JsonLines() if fmt == "json" else PlainLines("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    handler.engine_handler = True  # type: ignore[attr-defined]
    return handler
