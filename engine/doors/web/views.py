"""How the pages say things: ages, durations, byte counts and percentages. Pure functions, shared
by the templates."""

from __future__ import annotations

from datetime import datetime, timezone



def parse_time(value: str | None) -> datetime | None:
    """A time as the store writes it (ISO 8601, UTC when it says no zone)."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def seconds(value: float | None) -> str:
    """1.2 s, 42 s, 3 min 04 s, 2 h 05 min."""
    if value is None:
        return "-"
    value = max(0.0, float(value))
    if value < 10:
        return f"{value:.1f} s"
    if value < 60:
        return f"{value:.0f} s"
    minutes, rest = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def ago(value: str | None, now: datetime | None = None) -> str:
    moment = parse_time(value)
    if moment is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    return seconds((now - moment).total_seconds()) + " ago"


def between(start: str | None, end: str | None) -> float | None:
    first, last = parse_time(start), parse_time(end)
    return (last - first).total_seconds() if first and last else None


def size(value: int | None) -> str:
    """Bytes as KiB, MiB or GiB."""
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def percent(fraction: float | None) -> int:
    return int(round(100 * max(0.0, min(1.0, float(fraction or 0.0)))))
