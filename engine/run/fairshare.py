"""Fair share between owners: the pure rule the claim follows among the ready sessions of the
queue head's priority (priority still decides first).

Start-time fair queueing on images: each owner has a finish tag F, the queue a virtual time V.
An owner with work waiting starts at S = max(F, V); the owner with the smallest S goes next (then
the smaller F, then the name); serving it moves V to its S and its F to S + cost / weight. Over
time owners with work waiting get images in proportion to their weights, an owner that was idle
comes back at V (no credit saved up while away, no debt), and one that arrives behind a long
queue of another's is served at the next claim. Images, not GPU-seconds, because a claim knows
the images it takes and not yet the seconds they will cost; a step that makes no image costs
`STEP_COST` of one, so nobody's device and model steps go by for free."""

from __future__ import annotations

from dataclasses import dataclass

STEP_COST = 0.05  # a step that makes no image, in images
CLOCK = ""  # the owner_shares row that holds the virtual time


@dataclass(frozen=True)
class Limits:
    weight: float = 1.0
    max_running: int = 0  # sessions in progress at once (0: no limit)
    max_pending: int = 0  # sessions not yet started, held and paused ones included (0: no limit)
    rate: int = 0  # submissions per minute (0: no limit)


def limits_of(owners: dict, owner: str) -> Limits:
    """An owner's limits from [owners.NAME] (else [owners."*"], else none), weight at least a hair."""
    found = owners.get(owner) or owners.get("*") or {}
    return Limits(max(float(found.get("weight", 1.0)), 1e-6), int(found.get("max_running", 0)),
                  int(found.get("max_pending", 0)), int(found.get("rate", 0)))


def start_tags(active: list[str], finish: dict[str, float], clock: float) -> dict[str, float]:
    return {owner: max(finish.get(owner, clock), clock) for owner in active}


def order(active: list[str], finish: dict[str, float], clock: float) -> list[str]:
    """The owners with work waiting, in the order their turn comes."""
    starts = start_tags(active, finish, clock)
    return sorted(active, key=lambda owner: (starts[owner], finish.get(owner, clock), owner))


def charge(finish: dict[str, float], clock: float, served: dict[str, float], weights: dict[str, float],
           chosen: str) -> tuple[dict[str, float], float]:
    """The tags after a claim that served `served` (owner -> cost; a shared call may serve several
    owners) with `chosen`'s turn: (new finish tags of those owners, new virtual time)."""
    start = max(finish.get(chosen, clock), clock)
    updated = {}
    for owner, cost in served.items():
        begins = start if owner == chosen else max(finish.get(owner, clock), clock)
        updated[owner] = begins + cost / weights.get(owner, 1.0)
    return updated, start


def cost_of(images: int) -> float:
    return float(images) if images > 0 else STEP_COST


def claim_order(queued: list[tuple[str, int, float]], finish: dict[str, float], clock: float,
                weights: dict[str, float], first: int) -> list[int]:
    """The first `first` of these ready sessions in the order the claim would take them, were
    nothing else to change: `queued` is (owner, priority, cost) of each, in queue order (priority,
    then age). Priority first; among one priority owners take turns (`order`, `charge`), each
    owner's sessions in its own queue order. Returns their indexes in `queued`."""
    finish, taken = dict(finish), []
    for priority in sorted({p for _, p, _ in queued}, reverse=True):
        queues: dict[str, list[int]] = {}
        for index, (owner, level, _) in enumerate(queued):
            if level == priority:
                queues.setdefault(owner, []).append(index)
        while queues and len(taken) < first:
            owner = order(list(queues), finish, clock)[0]
            index = queues[owner].pop(0)
            updated, clock = charge(finish, clock, {owner: queued[index][2]}, weights, owner)
            finish.update(updated)
            taken.append(index)
            if not queues[owner]:
                del queues[owner]
    return taken
