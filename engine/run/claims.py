"""The life of a step under a runner: claim under a lease, heartbeat, complete, fail, release,
and the recovery of steps whose lease expired. Fencing: a result is recorded only by the runner
that holds the step's current lease (same runner id and attempt).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, select, text, update

from engine.run.affinity import Candidate, Offer, choose
from engine import ending
from engine.errors import StaleLease
from engine.run.grouping import call_limit, images_of, take_partners
from engine.machines import ITEM
from engine.store import Store, Tx
from engine.store.events import epoch_of
from engine.store.tables import leases, owner_shares, sessions, steps
from engine.run import fairshare


ANYWHERE = Offer(lookahead=1)  # a claim that is no device's worker's: any session, no model preference


@dataclass(frozen=True)
class Claim:
    session_id: str
    run: int
    step_index: int
    step_type: str
    domain: str
    attempt: int
    runner_id: str
    workflow_id: str
    params: dict[str, Any]
    step_config: dict[str, Any]
    total_steps: int
    batch_id: str | None
    item_index: int | None
    previous: tuple = ()  # (step_index, attempt, output) of the run's earlier steps
    group_key: str | None = None  # set when the step's handler serves groups (engine.run.grouping)
    job_id: str | None = None

    @property
    def session_ref(self) -> dict[str, Any]:
        """What the outbox needs to name this session's folder."""
        return {"session_id": self.session_id, "run": self.run, "batch_id": self.batch_id,
                "item_index": self.item_index}


@dataclass(frozen=True)
class Policy:
    lease_seconds: float
    max_attempts: int
    backoff_base: float
    backoff_max: float
    max_recoveries: int = 20

    @classmethod
    def from_config(cls, config) -> "Policy":
        runner = config.values["runner"]
        return cls(runner["lease_seconds"], runner["max_attempts"], runner["backoff_base_seconds"],
                   runner["backoff_max_seconds"], runner["max_recoveries"])

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_base * 2 ** (attempt - 1), self.backoff_max)


def _best_ready(tx: Tx, now: float, offer: Offer, share: "FairShare | None" = None) -> dict | None:
    """The ready session this worker takes next: the queue's head (priority, then age); with fair
    share, the head of the owner whose turn it is among those with ready sessions of the head's
    priority (engine.run.fairshare); within that, model affinity (engine.run.affinity): another
    session of the same priority within `lookahead` places whose model is warm here. Only then
    are more rows than the head read (and, on PostgreSQL, locked)."""
    dialect = tx.store.dialect
    where = {"now": now, **offer.claim_filter()}
    head = dialect.fetch_one(tx.conn, dialect.claim_query, {**where, "n": 1})
    if head is None:
        return None
    if share is not None and share.enabled:
        return share.turn(tx, head, where, offer)
    return _with_affinity(tx, head, dialect.claim_query, where, offer)


def _with_affinity(tx: Tx, head: dict, query, where: dict, offer: Offer) -> dict:
    if not head["model"] or head["model"] in offer.warm or offer.lookahead <= 1:
        return head
    rows = tx.store.dialect.fetch_all(tx.conn, query, {**where, "n": offer.lookahead})
    candidates = [Candidate(r["session_id"], r["priority"], r["model"] or "") for r in rows]
    return rows[choose(candidates, offer.warm, offer.lookahead)] if rows else head


ACTIVE_OWNERS = text("""
    WITH RECURSIVE o(owner) AS (
        SELECT MIN(owner) FROM sessions WHERE ready = 1 AND priority = :priority
        UNION ALL
        SELECT (SELECT MIN(s.owner) FROM sessions s WHERE s.ready = 1 AND s.priority = :priority AND s.owner > o.owner)
        FROM o WHERE o.owner IS NOT NULL)
    SELECT owner FROM o WHERE owner IS NOT NULL""")


NEWEST_SESSION = select(func.max(sessions.c.created_event))
SET_TAG = update(owner_shares).where(owner_shares.c.owner == bindparam("o")).values(finish=bindparam("f"))
ADD_TAG = insert(owner_shares).values(owner=bindparam("o"), finish=bindparam("f"))


class FairShare:
    """The claim's fair share between owners ([runner] fair_share, [owners.NAME] weight and
    max_running): whose turn it is (engine.run.fairshare.order) and, once claimed, its charge."""

    ACTIVE_TTL = 2.0  # seconds the owners with ready sessions are remembered, while no session is created

    def __init__(self, owners: dict, enabled: bool = True) -> None:
        self.owners, self.enabled = owners, enabled
        self._limits: dict[str, fairshare.Limits] = {}
        self._active: dict[int, tuple[int, float, list[str]]] = {}  # priority -> (newest session, when, owners)
        self._tags: tuple[dict[str, float], float, float, set[str]] | None = None  # finish, clock, read at, unknown

    def active(self, tx: Tx, priority: int) -> list[str]:
        """The owners with ready sessions of this priority: one index seek per owner, remembered
        until a session is created or ACTIVE_TTL passes (a session resumed or retried meanwhile
        is seen then; an owner remembered whose sessions are gone is skipped at its turn)."""
        newest = next(iter(tx.store.dialect.fetch_one(tx.conn, NEWEST_SESSION, {}).values())) or 0
        known = self._active.get(priority)
        now = time.monotonic()
        if known is not None and known[0] == newest and now - known[1] < self.ACTIVE_TTL:
            return known[2]
        found = [r.owner for r in tx.conn.execute(ACTIVE_OWNERS, {"priority": priority})]
        self._active[priority] = (newest, now, found)
        return found

    @classmethod
    def from_config(cls, config) -> "FairShare":
        return cls(dict(config.values.get("owners") or {}), bool(config.get("runner", "fair_share")))

    def limits(self, owner: str) -> fairshare.Limits:
        found = self._limits.get(owner)
        if found is None:
            found = self._limits[owner] = fairshare.limits_of(self.owners, owner)
        return found

    def turn(self, tx: Tx, head: dict, where: dict, offer: Offer) -> dict | None:
        dialect = tx.store.dialect
        active = self.active(tx, head["priority"])
        if head["owner"] not in active:  # the head's owner came since it was remembered
            active = [*active, head["owner"]]
        if len(active) <= 1 and not any(self.limits(o).max_running for o in active):
            return _with_affinity(tx, head, dialect.claim_query, where, offer)
        finish, clock = self.tags(tx, active)
        running = self._running(tx, active)
        for owner in fairshare.order(active, finish, clock):
            cap = self.limits(owner).max_running
            query = dialect.owner_running_query if cap and running.get(owner, 0) >= cap else dialect.owner_query
            params = {**where, "owner": owner, "priority": head["priority"]}
            first = dialect.fetch_one(tx.conn, query, {**params, "n": 1})
            if first is not None:
                return _with_affinity(tx, first, query, params, offer)
        return None  # every owner of this priority is at its max_running or has nothing this worker may run

    def _running(self, tx: Tx, active: list[str]) -> dict[str, int]:
        capped = [o for o in active if self.limits(o).max_running]
        if not capped:
            return {}
        rows = tx.conn.execute(select(sessions.c.owner, func.count()).where(
            sessions.c.owner.in_(capped), sessions.c.status == "running").group_by(sessions.c.owner))
        return dict(rows.all())

    TAGS_TTL = 0.5  # seconds this runner's copy of the tags is used before it is read again

    def tags(self, tx: Tx, owners: list[str]) -> tuple[dict[str, float], float]:
        """The owners' finish tags and the virtual time: this runner's copy, read again from the
        store when older than TAGS_TTL or missing an owner (other runners' charges are seen then;
        this runner's own are written through)."""
        copy = self._tags
        now = time.monotonic()
        if copy is None or now - copy[2] > self.TAGS_TTL or not set(owners) <= copy[0].keys() | copy[3]:
            rows = dict(tx.conn.execute(select(owner_shares.c.owner, owner_shares.c.finish)
                                        .where(owner_shares.c.owner.in_([fairshare.CLOCK, *owners]))).all())
            finish = {o: f for o, f in rows.items() if o != fairshare.CLOCK}
            copy = (finish, rows.get(fairshare.CLOCK, 0.0), now, set(owners) - finish.keys())
            self._tags = copy
        return copy[0], copy[1]

    def charge(self, tx: Tx, chosen: str, served: dict[str, float]) -> None:
        """Record a claim that served `served` (owner -> cost) in `chosen`'s turn."""
        finish, clock = self.tags(tx, list(served))
        weights = {o: self.limits(o).weight for o in served}
        updated, clock = fairshare.charge(finish, clock, served, weights, chosen)
        dialect = tx.store.dialect
        for owner, tag in {**updated, fairshare.CLOCK: clock}.items():
            if not dialect.execute(tx.conn, SET_TAG, {"o": owner, "f": tag}):
                dialect.execute(tx.conn, ADD_TAG, {"o": owner, "f": tag})
        copy = self._tags
        self._tags = ({**copy[0], **updated}, clock, copy[2], copy[3] - updated.keys())


def claim_group_in(tx: Tx, runner_id: str, policy: Policy, batching: dict[str, Any],
                   offer: Offer = ANYWHERE, share: FairShare | None = None) -> list[Claim]:
    claimed = _claim_group_in(tx, runner_id, policy, batching, offer, share)
    if claimed and share is not None and share.enabled:
        served: dict[str, float] = {}
        for claim in claimed:
            session = tx.get("sessions", (claim.session_id,))
            images = images_of(json.loads(session["params"])) if claim.domain == "inference" else 0
            served[session["owner"]] = served.get(session["owner"], 0.0) + fairshare.cost_of(images)
        share.charge(tx, tx.get("sessions", (claimed[0].session_id,))["owner"], served)
    return claimed


def _claim_group_in(tx: Tx, runner_id: str, policy: Policy, batching: dict[str, Any],
                    offer: Offer, share: FairShare | None) -> list[Claim]:
    """The best runnable step for this worker (the leader: highest priority, then oldest, with model
    affinity within the lookahead) and, when its handler serves groups, compatible ready steps that
    join its call, in queue order, up to the call's image limit. Each keeps its own lease, attempt
    and fencing. Empty when nothing is runnable.

    While the call is not full and the leader has waited less than `max_wait_ms`, a session whose
    earlier step stands between it and the group runs that step first, so that it can join."""
    now = time.time()
    tx.projection.flush()
    dialect = tx.store.dialect
    found = _best_ready(tx, now, offer, share)
    if found is None:
        return []
    leader_id, key = found["session_id"], found["group_key"]
    leader = tx.get("sessions", (leader_id,))
    if not key or not (leader["batch_id"] or batching.get("coalesce", True)):
        return [_claim_step(tx, leader_id, found["step_index"], runner_id, policy, now, offer)]
    batch = tx.get("batches", (leader["batch_id"],)) if leader["batch_id"] else None
    limit = call_limit(json.loads(batch["config"]) if batch else None, batching, _profile(tx, leader))
    where = {"now": now, "group": key, **offer.claim_filter()}
    candidates = []
    for row in dialect.fetch_all(tx.conn, dialect.partners_query, {**where, "n": 4 * limit + 1}):
        session = tx.get("sessions", (row["session_id"],))
        # A batch's items share calls among themselves (its sizes rule them); single sessions with singles.
        if row["session_id"] != leader_id and session["batch_id"] == leader["batch_id"]:
            candidates.append((row["session_id"], images_of(json.loads(session["params"]))))
    leader_images = images_of(json.loads(leader["params"]))
    partners = take_partners(limit, leader_images, candidates)
    room = limit - leader_images - sum(dict(candidates)[p] for p in partners)
    if room > 0 and waited_ms(found["updated_at"], now) < batching.get("max_wait_ms", 0):
        follower = dialect.fetch_one(tx.conn, dialect.followers_query, where)
        if follower is not None and tx.get("sessions", (follower["session_id"],))["batch_id"] == leader["batch_id"]:
            return [_claim_step(tx, follower["session_id"], follower["step_index"], runner_id, policy, now, offer)]
    return [_claim_step(tx, session_id, tx.get("sessions", (session_id,))["current_step"], runner_id, policy, now,
                        offer) for session_id in [leader_id, *partners]]


def _profile(tx: Tx, session: dict) -> dict | None:
    """The memory measured for the session's model, size and current step's mode, if any."""
    params = json.loads(session["params"])
    if not params.get("model"):
        return None
    mode = json.loads(session["steps"])[session["current_step"]].get("config", {}).get("mode", "")
    return tx.get("memory_profiles", (params["model"], params.get("width") or 0, params.get("height") or 0, mode))


def waited_ms(updated_at: str, now: float) -> float:
    """How long ago (ms) a session last changed: for a ready step, how long it has waited."""
    then = epoch_of(updated_at)
    return max(0.0, (now - then) * 1000.0)


def _claim_step(tx: Tx, session_id: str, index: int, runner_id: str, policy: Policy, now: float,
                offer: Offer = ANYWHERE) -> Claim:
    session = tx.get("sessions", (session_id,))
    if session["status"] == "pending":
        tx.emit("session", session_id, "session.started", {"session_id": session_id, "run": session["run"]})
        _item_started(tx, session)
    earlier = tx.projection.children("steps", session_id)  # one read for all steps; seeds the next get
    step = tx.get("steps", (session_id, index))
    attempt = step["attempts"] + 1
    tx.emit("session", session_id, "step.claimed", {
        "session_id": session_id, "run": session["run"], "step_index": index, "attempt": attempt,
        "runner_id": runner_id, **({"device": offer.device_id, "worker": offer.worker} if offer.device_id else {}),
    })
    # No lease exists for a pending step: every way out of `running` removes it.
    tx.store.dialect.execute(tx.conn, INSERT_LEASE, {
        "session_id": session_id, "step_index": index, "run": session["run"], "attempt": attempt,
        "runner_id": runner_id, "expires_at": now + policy.lease_seconds, "progress": 0.0, "message": None,
    })
    step_spec = json.loads(session["steps"])[index]
    previous = tuple((s["step_index"], s["attempts"], json.loads(s["output"] or "{}"))
                     for s in earlier if s["step_index"] < index)
    return Claim(session_id, session["run"], index, step["step_type"], step["domain"], attempt, runner_id,
                 session["workflow_id"], json.loads(session["params"]), step_spec.get("config", {}),
                 session["total_steps"], session["batch_id"], session["item_index"], previous,
                 step_spec.get("group"), session.get("job_id"))


def _item_started(tx: Tx, session: dict) -> None:
    if not session["batch_id"]:
        return
    batch_id = session["batch_id"]
    batch = tx.get("batches", (batch_id,))
    if batch["status"] == "pending":
        tx.emit("batch", batch_id, "batch.started", {"batch_id": batch_id})
    item = tx.get("items", (batch_id, session["item_index"]))
    if item and ITEM.allowed("start", item["status"]):
        tx.emit("batch", batch_id, "item.started", {"batch_id": batch_id, "item_index": session["item_index"],
                                                     "session_id": session["session_id"]})


def claim_group(store: Store, runner_id: str, policy: Policy, batching: dict[str, Any],
                offer: Offer = ANYWHERE, share: FairShare | None = None) -> list[Claim]:
    return store.write(lambda tx: claim_group_in(tx, runner_id, policy, batching, offer, share))


_HELD = and_(leases.c.session_id == bindparam("sid"), leases.c.step_index == bindparam("idx"),
             leases.c.runner_id == bindparam("rid"), leases.c.attempt == bindparam("held_attempt"),
             leases.c.run == bindparam("held_run"))
DELETE_LEASE = delete(leases).where(leases.c.session_id == bindparam("sid"), leases.c.step_index == bindparam("idx"))
INSERT_LEASE = insert(leases)
TAKE_LEASE = delete(leases).where(_HELD)
RENEW_LEASE = update(leases).where(_HELD)
SESSION_STATUS = select(sessions.c.status).where(sessions.c.session_id == bindparam("sid"))


def _held(claim: Claim) -> dict[str, Any]:
    return {"sid": claim.session_id, "idx": claim.step_index, "rid": claim.runner_id, "held_attempt": claim.attempt,
            "held_run": claim.run}


def _take_lease(tx: Tx, claim: Claim) -> None:
    """Fencing: the caller must still hold this step's lease, or nothing is recorded."""
    removed = tx.store.dialect.execute(tx.conn, TAKE_LEASE, _held(claim))
    # One read of all the session's steps: the reducer then finds the next one without another.
    tx.projection.children("steps", claim.session_id)
    step = tx.get("steps", (claim.session_id, claim.step_index))
    if not removed or step is None or step["status"] != "running" or step["attempts"] != claim.attempt \
            or step["run"] != claim.run:
        raise StaleLease(f"step {claim.step_index} of {claim.session_id}: lease lost (attempt {claim.attempt})")


def heartbeat_all(store: Store, claims: list[Claim], policy: Policy, progress: float | None = None,
                  message: str | None = None) -> list[tuple[bool, str | None]]:
    """Renew the leases of the claims of one call (and record its live progress on each) in one
    transaction. Returns (still owned, session status) for each claim."""
    values: dict[str, Any] = {"expires_at": time.time() + policy.lease_seconds}
    if progress is not None:
        values.update(progress=max(0.0, min(1.0, progress)), message=message)

    def renew(tx: Tx) -> list[tuple[bool, str | None]]:
        return [(tx.conn.execute(RENEW_LEASE.values(**values), _held(claim)).rowcount > 0,
                 tx.conn.execute(SESSION_STATUS, {"sid": claim.session_id}).scalar()) for claim in claims]

    return store.write(renew)


def session_statuses(store: Store, session_ids: list[str]) -> list[str | None]:
    """Each session's status (None for a session that is gone), in one read."""
    with store.read() as conn:
        return [conn.execute(SESSION_STATUS, {"sid": session_id}).scalar() for session_id in session_ids]


def complete_in(tx: Tx, claim: Claim, output: dict[str, Any], duration_s: float) -> bool:
    """Record a step's completion; returns True when it ended its session."""
    _take_lease(tx, claim)
    tx.emit("session", claim.session_id, "step.completed", {
        "session_id": claim.session_id, "run": claim.run, "step_index": claim.step_index,
        "attempt": claim.attempt, "duration_s": round(duration_s, 6), "output": output,
    })
    return ending.complete_if_done(tx, claim.session_id)


def fail_in(tx: Tx, claim: Claim, code: str, message: str, retryable: bool, policy: Policy) -> bool:
    """Record a failed attempt: retried with backoff, or the step and its session fail. True if ended."""
    _take_lease(tx, claim)
    return _failed_attempt(tx, claim.session_id, claim.run, claim.step_index, claim.attempt, code, message,
                           retryable, policy)


def _failed_attempt(tx: Tx, session_id: str, run: int, index: int, attempt: int, code: str, message: str,
                    retryable: bool, policy: Policy) -> bool:
    base = {"session_id": session_id, "run": run, "step_index": index, "attempt": attempt, "code": code,
            "message": message[:2000]}
    step = tx.get("steps", (session_id, index))
    failures = attempt - ((step or {}).get("recoveries") or 0)  # recoveries are attempts, not failures
    if retryable and failures < policy.max_attempts:
        tx.emit("session", session_id, "step.retried", {**base, "not_before": time.time() + policy.backoff(failures)})
        return False
    return _step_failed(tx, base)


def _step_failed(tx: Tx, base: dict) -> bool:
    """step.failed, and its session fails with the step's code and message. True if the session ended."""
    tx.emit("session", base["session_id"], "step.failed", base)
    return ending.fail(tx, base["session_id"], base["run"], base["step_index"], base["code"], base["message"])


def release_in(tx: Tx, claim: Claim, reason: str) -> None:
    """Hand an interrupted step back (paused mid-step): pending again, this attempt not counted."""
    _take_lease(tx, claim)
    tx.emit("session", claim.session_id, "step.released", {
        "session_id": claim.session_id, "run": claim.run, "step_index": claim.step_index,
        "attempt": claim.attempt, "reason": reason,
    })


def recovered(tx: Tx, session_id: str, step: dict, why: str, policy: Policy) -> None:
    """A running step whose runner died goes back to pending: a recovery, not a failure, so it keeps
    its attempts; past `[runner] max_recoveries` (a step that kills its runner every time: out of
    memory, a crashing extension) the step and its session fail with RUNNER_LOST."""
    index, recoveries = step["step_index"], step.get("recoveries") or 0
    base = {"session_id": session_id, "run": step["run"], "step_index": index, "attempt": step["attempts"]}
    if recoveries < policy.max_recoveries:
        tx.emit("session", session_id, "step.retried", {**base, "code": "RUNNER_LOST", "message": why,
                                                        "recovery": True, "not_before": time.time()})
        return
    _step_failed(tx, {**base, "code": "RUNNER_LOST", "message": (
        f"{why}, {recoveries + 1} times in all ([runner] max_recoveries is {policy.max_recoveries}): this step may "
        "be what kills its runner (out of memory, a crashing extension or driver)")})


def reap_expired(store: Store, policy: Policy, now: float | None = None, dead_runners: list[str] = (),
                 orphans: bool = False) -> int:
    """Running steps whose lease expired go back to pending (a recovery: see `recovered`).

    Every running step holds a lease (claims insert one; every way out of `running` removes it), so
    the leases table, indexed by expiry, finds them. `dead_runners`: runners known to be gone (a
    restarting runner's own earlier life, a process on this host that no longer exists); their
    leases are dead whatever their expiry. `orphans`: also look for running steps with no lease at
    all (a scan of the steps table, done once at start)."""
    now = time.time() if now is None else now
    dead_ids = list(dead_runners)
    dead = leases.c.expires_at < now
    if dead_ids:
        dead = dead | leases.c.runner_id.in_(dead_ids)
    with store.read() as conn:
        found = conn.execute(select(leases.c.session_id, leases.c.step_index).where(dead)).all()
        if orphans:
            found += conn.execute(
                select(steps.c.session_id, steps.c.step_index)
                .select_from(steps.outerjoin(leases, and_(leases.c.session_id == steps.c.session_id,
                                                          leases.c.step_index == steps.c.step_index)))
                .where(steps.c.status == "running", leases.c.session_id.is_(None))
            ).all()
    count = 0
    for session_id, index in found:
        def reap(tx: Tx, session_id=session_id, index=index) -> bool:
            lease = tx.conn.execute(select(leases).where(leases.c.session_id == session_id,
                                                         leases.c.step_index == index)).first()
            if lease is not None and lease.expires_at >= now and lease.runner_id not in dead_ids:
                return False  # renewed meanwhile
            tx.conn.execute(DELETE_LEASE, {"sid": session_id, "idx": index})
            step = tx.get("steps", (session_id, index))
            if step is None or step["status"] != "running":
                return False
            why = ("the runner holding this step is gone" if lease is not None and lease.runner_id in dead_ids
                   else "the runner holding this step stopped (lease expired)")
            recovered(tx, session_id, step, why, policy)
            return True
        count += store.write(reap)
    return count
