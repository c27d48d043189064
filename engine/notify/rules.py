"""The delivery rules, as pure functions: which events a job's notify reports, when a failed
attempt is tried again (exponential backoff with jitter) and when a delivery is dead, and which
addresses a delivery may not go to."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Policy:
    max_attempts: int
    max_age_seconds: float
    backoff_base: float
    backoff_max: float

    @classmethod
    def from_config(cls, config) -> "Policy":
        notify = config.values["notify"]
        return cls(int(notify["max_attempts"]), float(notify["max_age_seconds"]), float(notify["backoff_base_seconds"]),
                   float(notify["backoff_max_seconds"]))


def wanted(event_type: str, notify: dict[str, Any] | None, default: dict[str, Any] | None) -> str | None:
    """The URL an event goes to: its job's own notify when it has one (and lists the event), else
    the [notify] default (when set and it lists the event); None: not reported."""
    chosen = notify if notify else default
    if not chosen or not chosen.get("url"):
        return None
    return chosen["url"] if event_type in chosen.get("events", ()) else None


def backoff(attempt: int, policy: Policy, rng: random.Random | None = None) -> float:
    """Seconds before the attempt after `attempt` (1 for the first): base * 2^(attempt-1), at most
    the max, with "full jitter" on its upper half (between half and all of it), so that many
    deliveries failing together do not come back together."""
    ceiling = min(policy.backoff_max, policy.backoff_base * (2 ** max(0, attempt - 1)))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


def is_dead(attempts_since_retry: int, age_seconds: float, policy: Policy) -> bool:
    """A delivery gives up after max_attempts attempts (counted since its last retry by hand) or
    once its event is older than max_age_seconds."""
    return attempts_since_retry >= policy.max_attempts or age_seconds >= policy.max_age_seconds


def address_refused(address: str, allow_private: bool) -> str | None:
    """Why a delivery may not go to this IP address (loopback, link-local, private, multicast,
    reserved, unspecified: what would let a job file reach inside this network), or None."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_multicast or ip.is_unspecified:
        return f"{address} is a multicast or unspecified address"
    # Loopback before reserved: IPv6's ::1 lies inside a reserved range too, and allow_private allows it.
    kind = next((k for k in ("loopback", "link_local", "private") if getattr(ip, f"is_{k}")), None)
    if kind is not None:
        if allow_private:
            return None
        return f"{address} is a {kind.replace('_', '-')} address ([notify] allow_private = true allows it)"
    if ip.is_reserved:
        return f"{address} is a reserved address"
    if allow_private:
        return None
    if not ip.is_global:
        return f"{address} is not a public address ([notify] allow_private = true allows it)"
    return None
