"""An owner's limits at submit, as pure rules: max_pending (sessions not yet started, held and
paused ones included) and rate (submissions a minute). The counts come from the store in the
submitting transaction (engine.commands); these say whether to refuse, and how."""

from __future__ import annotations

import math

from engine.errors import QuotaExceeded, RateLimited
from engine.run.fairshare import Limits

WINDOW_SECONDS = 60.0


def check_pending(owner: str, pending: int, adding: int, limits: Limits) -> None:
    """QUOTA_EXCEEDED when `adding` more sessions would take the owner past max_pending."""
    if limits.max_pending and pending + adding > limits.max_pending:
        raise QuotaExceeded(f"owner {owner!r} has {pending} session(s) not yet started; {adding} more would pass its "
                            f"max_pending of {limits.max_pending} ([owners.{owner}])", [{"loc": "owner"}])


def check_rate(owner: str, recent: list[float], now: float, limits: Limits) -> None:
    """RATE_LIMITED when the owner made `rate` submissions in the last minute (`recent`: their
    times, epoch seconds); Retry-After is when the oldest of them leaves the window."""
    if not limits.rate:
        return
    inside = sorted(t for t in recent if now - t < WINDOW_SECONDS)
    if len(inside) >= limits.rate:
        wait = max(1, math.ceil(inside[len(inside) - limits.rate] + WINDOW_SECONDS - now))
        raise RateLimited(f"owner {owner!r} made {len(inside)} submissions in the last minute, its rate is "
                          f"{limits.rate} ([owners.{owner}]); try again in {wait} s", wait, [{"loc": "owner"}])
