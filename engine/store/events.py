"""Events: the frozen records the log is made of, and their JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def now_iso() -> str:
    """UTC timestamps as sortable text, the same on SQLite and PostgreSQL."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def epoch_of(text: str) -> float:
    """Epoch seconds of a timestamp `now_iso` wrote."""
    return datetime.strptime(str(text), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


@dataclass(frozen=True, slots=True)
class Event:
    stream_type: str
    stream_id: str
    seq: int
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    event_id: int | None = None

    def row(self) -> dict[str, Any]:
        return {
            "stream_type": self.stream_type,
            "stream_id": self.stream_id,
            "seq": self.seq,
            "type": self.type,
            "data": dumps(self.data),
            "created_at": self.created_at,
        }

    def as_dict(self) -> dict[str, Any]:
        """The event as every door shows it."""
        return {"event_id": self.event_id, "stream_type": self.stream_type, "stream_id": self.stream_id,
                "seq": self.seq, "type": self.type, "data": self.data, "created_at": self.created_at}

    @classmethod
    def from_row(cls, row: Any) -> "Event":
        """From a row of the events table, columns in table order (unpacked: replay reads millions)."""
        event_id, stream_type, stream_id, seq, type_, data, created_at = row
        return cls(stream_type, stream_id, seq, type_, json.loads(data), created_at, event_id)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def storable_text(text: str) -> str:
    """Text every database can hold: a NUL (PostgreSQL refuses it in text) written as `\\x00`, a
    lone surrogate (not UTF-8 at all) as `\\udXXX`; any other text is returned as it is."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def storable(value: Any) -> Any:
    """`value` with every string in it (keys too) made storable_text."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value
