"""Which ready session a worker takes next, and which sessions a worker may take at all: pure rules.

A runner has one worker per device. A job may be pinned to a device (`device` in its params: an id
such as `cuda:1`, or a kind such as `cuda`); a worker takes only sessions pinned to nothing or to
its own device. Among those, priority rules, then age; model affinity breaks in only among the
sessions of the head's priority within `lookahead` places of the queue's head: a worker prefers one
whose model it already has warm; when it has none of theirs warm, it takes the model with the most
work waiting there (its oldest session), so that the load it must pay serves the most images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.params import pin_of  # noqa: F401 - the rule's input, named here with the rules

CUDA_KINDS = ("cuda", "rocm")  # torch reaches both as "cuda:N": a job pinned to "cuda" runs on either


@dataclass(frozen=True)
class Offer:
    """What a worker offers when it claims: its device, the models it keeps warm, how far it looks."""

    device_id: str = ""
    kind: str = ""
    warm: frozenset[str] = field(default_factory=frozenset)
    lookahead: int = 32
    worker: str = ""  # the worker's name (its device id, numbered when a device has several)

    def claim_filter(self) -> dict[str, object]:
        """The claim queries' device parameters (engine.store.dialects.runs_here): besides sessions
        pinned to nothing, those pinned to this worker's id, its kind, or "cuda" for ROCm; a claim
        that is no worker's (no device) takes sessions pinned anywhere."""
        alias = "cuda" if self.kind in CUDA_KINDS else self.kind
        return {"any_device": int(not self.device_id), "pin_id": self.device_id, "pin_kind": self.kind,
                "pin_alias": alias}


@dataclass(frozen=True)
class Candidate:
    session_id: str
    priority: int
    model: str  # "" when the session needs no model


def choose(candidates: list[Candidate], warm: frozenset[str] | set[str], lookahead: int) -> int:
    """The index of the candidate to take from `candidates` (queue order: priority, then age)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    head = candidates[0]
    if not head.model or head.model in warm or lookahead <= 1:
        return 0
    window = [c for c in candidates[:lookahead] if c.priority == head.priority]
    for index, candidate in enumerate(window):
        if candidate.model and candidate.model in warm:
            return index
    waiting: dict[str, int] = {}
    for candidate in window:
        if candidate.model:
            waiting[candidate.model] = waiting.get(candidate.model, 0) + 1
    most = max(waiting.values())
    return next(index for index, c in enumerate(window) if c.model and waiting[c.model] == most)


def offers(pin: str, worker_names: list[str]) -> bool:
    """Whether one of these workers (`cuda:0`, `cpu#2`: names as runners register them) runs a
    session pinned to `pin` (an id, or a kind: `cuda` for every `cuda:N`)."""
    if not pin:
        return True
    for name in worker_names:
        device_id = name.split("#", 1)[0].lower()
        if pin in (device_id, device_id.split(":", 1)[0]):
            return True
    return False


def waiting_reason(pin: str, live_workers: list[str]) -> str | None:
    """Why a ready session is not taken, when no live runner can take it; None when one can."""
    if not live_workers:
        return "no runner is running: start one with `engine run`"
    if not offers(pin, live_workers):
        return (f"pinned to device {pin!r}, which no live runner offers (live runners offer: "
                f"{', '.join(sorted(set(live_workers)))}); start a runner with that device in [runner] devices")
    return None
