"""Submitting jobs and controlling sessions and batches: the one API that the CLI, the inbox and
the tests call. Every change is a state-machine transition recorded as an event.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from sqlalchemy import func, select

from engine import ending
from engine.errors import DuplicateJob, InvalidTransition, NotFound, ValidationError
from engine.ingest.intake import Intake, ResolvedSession
from engine.ingest.jobs import ACTIONS, DEFAULT_OWNER, BatchJob, ControlJob, SessionJob
from engine.machines import ACTIVE, BATCH, SESSION
from engine.queries import find_target
from engine.store import Store, Tx
from engine.ingest import quotas
from engine.run.fairshare import limits_of
from engine.store.events import epoch_of
from engine.store.projection import DatabaseProjection
from engine.store.tables import batches, jobs, leases, sessions



def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class Submitted:
    target_type: str  # session | batch | control
    target_id: str
    already: bool = False  # the same file was taken before (a crash between commit and move)
    events: tuple = ()  # what the submission appended (a control may have ended sessions)


@dataclass(frozen=True)
class Source:
    """Where a job came from. `identity` names that very file (see engine.ingest.seen); a job submitted
    without one (the CLI, the tests) gets a fresh one, so every submission is a new job unless its
    job_id was seen before. `stored_as`: the name the inbox will move the file to."""

    file_name: str
    content_hash: str
    identity: str = field(default_factory=lambda: uuid.uuid4().hex)
    stored_as: str | None = None
    inode: int | None = None

    @property
    def file_key(self) -> str:
        return f"file:{self.identity}"

    def fields(self) -> dict[str, Any]:
        return {"job_key": self.file_key, "file_name": self.file_name, "content_hash": self.content_hash,
                "file_identity": self.identity, "stored_as": self.stored_as, "file_inode": self.inode}


# submitting ----------------------------------------------------------------------------------

def submit(store: Store, intake: Intake, job: SessionJob | BatchJob | ControlJob, source: Source,
           still_there: Callable[[], bool] | None = None, resent_is_same: bool = False) -> Submitted:
    """Validate and record a job: session.created or batch.created, then job.received.

    `still_there`: asked inside the transaction; False (the file was taken by another runner and
    moved meanwhile) records nothing. A job_id accepted before is DUPLICATE_JOB, pointing at what
    it made; `resent_is_same` (a protocol whose client-chosen id names one session) answers with
    that instead (`already`)."""
    try:
        return _submit(store, intake, job, source, still_there)
    except DuplicateJob as exc:
        if not resent_is_same:
            raise
        return Submitted(exc.extra["existing_type"], exc.extra["existing_id"], already=True)


def _submit(store: Store, intake: Intake, job: SessionJob | BatchJob | ControlJob, source: Source,
            still_there: Callable[[], bool] | None) -> Submitted:
    if isinstance(job, ControlJob):
        return _submit_control(store, job, source, still_there)
    resolved = intake.session(job) if isinstance(job, SessionJob) else intake.batch(job)

    def record(tx: Tx) -> Submitted:
        earlier = _taken_before(tx, source, job.job_id, still_there)
        if earlier is not None:
            return earlier
        _check_owner_limits(tx, intake, job.owner or DEFAULT_OWNER, 1 if isinstance(job, SessionJob) else len(resolved))
        if isinstance(job, SessionJob):
            target_type, target_id = "session", new_id("ses")
            _create_session(tx, target_id, job, resolved)
        else:
            target_type, target_id = "batch", new_id("bat")
            _create_batch(tx, target_id, job, resolved)
        tx.emit("job", source.file_key, "job.received", {
            **source.fields(), "job_id": job.job_id, "target_type": target_type, "target_id": target_id,
        })
        return Submitted(target_type, target_id)

    return store.write(record)


def _check_owner_limits(tx: Tx, intake: Intake, owner: str, adding: int) -> None:
    """The owner's max_pending and rate ([owners.NAME]), counted in this transaction (submitters
    of one owner take turns here, so two cannot both pass the last place)."""
    limits = limits_of(intake.config.values.get("owners") or {}, owner)
    if not (limits.max_pending or limits.rate):
        return
    tx.store.dialect.serialize(tx.conn, f"owner:{owner}")
    tx.projection.flush()
    if limits.max_pending:
        pending = tx.conn.execute(select(func.count()).select_from(sessions).where(
            sessions.c.owner == owner, sessions.c.status.in_(("pending", "paused")),
            sessions.c.started_at.is_(None))).scalar()
        quotas.check_pending(owner, pending, adding, limits)
    if limits.rate:
        now = time.time()
        since = datetime.fromtimestamp(now - quotas.WINDOW_SECONDS, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        times = [r[0] for r in tx.conn.execute(
            select(sessions.c.created_at).where(sessions.c.owner == owner, sessions.c.batch_id.is_(None),
                                                sessions.c.created_at >= since)
            .union_all(select(batches.c.created_at).where(batches.c.owner == owner, batches.c.created_at >= since)))]
        quotas.check_rate(owner, [epoch_of(t) for t in times], now, limits)


def taken_file(conn, identity: str) -> dict | None:
    """The jobs row of the very file with this identity, if it was taken (accepted or rejected)."""
    row = conn.execute(select(jobs).where(jobs.c.file_identity == identity)).mappings().first()
    return dict(row) if row is not None else None


def _taken_before(tx: Tx, source: Source, job_id: str | None,
                  still_there: Callable[[], bool] | None = None) -> Submitted | None:
    """`already` when this very file was taken before (by another runner, or before a crash);
    DUPLICATE_JOB when another job had this job_id. Runners taking one file take turns here:
    under PostgreSQL's read committed, a check and an insert could otherwise both pass."""
    tx.store.dialect.serialize(tx.conn, source.file_key)
    row = taken_file(tx.conn, source.identity)
    if row is not None:
        return Submitted(row["target_type"] or "rejected", row["target_id"] or "", already=True)
    if still_there is not None and not still_there():
        return Submitted("gone", "", already=True)
    if job_id:
        tx.store.dialect.serialize(tx.conn, f"job_id:{job_id}")  # two files with one job_id, two runners
        refuse_duplicate(tx.conn, job_id)
    return None


def refuse_duplicate(conn, job_id: str | None) -> None:
    """DUPLICATE_JOB when an accepted job already has this job_id."""
    if not job_id:
        return
    row = conn.execute(select(jobs.c.target_type, jobs.c.target_id)
                       .where(jobs.c.job_id == job_id, jobs.c.status == "accepted")).first()
    if row is not None:
        raise DuplicateJob(f"job_id {job_id!r} was already submitted as {row.target_type} {row.target_id}",
                           existing_type=row.target_type, existing_id=row.target_id)


def check(store: Store, intake: Intake, job: SessionJob | BatchJob | ControlJob) -> str:
    """Everything submit checks, reading the store and writing nothing (`engine validate`): the
    same errors submit would raise. Returns what the job would be: session, batch or control."""
    if isinstance(job, SessionJob):
        intake.session(job)
    elif isinstance(job, BatchJob):
        intake.batch(job)
    with store.read() as conn:
        refuse_duplicate(conn, job.job_id)
        if isinstance(job, ControlJob):
            view = DatabaseProjection(conn, store.dialect)
            target_type, target_id = find_target(conn, job.target)
            if job.action == "priority":
                table = "sessions" if target_type == "session" else "batches"
                _check_reprioritize(view.get(table, (target_id,)), target_type, target_id)
            elif target_type == "session":
                _check_session_control(view.get("sessions", (target_id,)), target_id, job.action)
            else:
                _check_batch_control(view, target_id, job.action)
    return job.kind


def _create_session(tx: Tx, session_id: str, job: SessionJob, resolved: ResolvedSession, **extra: Any) -> None:
    tx.emit("session", session_id, "session.created", {
        "session_id": session_id, "job_id": job.job_id, "workflow_id": resolved.workflow_id,
        "priority": job.priority, "hold": job.hold, "params": resolved.params, "steps": resolved.steps,
        "owner": job.owner or DEFAULT_OWNER, **({"notify": job.notify.model_dump()} if job.notify else {}), **extra,
    })


def _create_batch(tx: Tx, batch_id: str, job: BatchJob, resolved: list[ResolvedSession]) -> None:
    item_ids = [new_id("ses") for _ in resolved]
    tx.emit("batch", batch_id, "batch.created", {
        "batch_id": batch_id, "job_id": job.job_id, "name": job.name, "priority": job.priority, "hold": job.hold,
        "config": job.batch.model_dump(), "items": item_ids, "owner": job.owner or DEFAULT_OWNER,
        **({"notify": job.notify.model_dump()} if job.notify else {}),
    })
    for index, (session_id, item) in enumerate(zip(item_ids, resolved)):
        _create_session(tx, session_id, SessionJob(job_id=None, workflow=job.workflow, priority=job.priority,
                                                   hold=job.hold, owner=job.owner), item, batch_id=batch_id,
                        item_index=index)


def record_rejection(store: Store, source: Source, error: dict[str, Any], job_id: str | None = None) -> bool:
    """job.rejected, with the whole error; False when this very file was recorded already."""

    def record(tx: Tx) -> bool:
        tx.store.dialect.serialize(tx.conn, source.file_key)
        if taken_file(tx.conn, source.identity) is not None:
            return False
        tx.emit("job", source.file_key, "job.rejected", {
            **source.fields(), "job_id": job_id, "code": error["code"], "message": error["message"], "error": error,
        })
        return True

    return store.write(record)


def record_stranded(store: Store, job_key: str, file_name: str, message: str) -> None:
    """job.stranded: a taken file could not be moved out of the inbox (it stays there, skipped)."""
    store.write(lambda tx: tx.emit("job", job_key, "job.stranded", {
        "job_key": job_key, "file_name": file_name, "message": message[:2000]}))


def _submit_control(store: Store, job: ControlJob, source: Source,
                    still_there: Callable[[], bool] | None = None) -> Submitted:
    def record(tx: Tx) -> Submitted:
        earlier = _taken_before(tx, source, job.job_id, still_there)
        if earlier is not None:
            return earlier
        target_type, target_id = find_target(tx.conn, job.target)
        apply_control(tx, target_type, target_id, job.action, job.priority)
        tx.emit("job", source.file_key, "job.received", {
            **source.fields(), "job_id": job.job_id, "target_type": target_type, "target_id": target_id,
            "action": job.action, **({"priority": job.priority} if job.action == "priority" else {}),
        })
        return Submitted("control", target_id)

    submitted, events = store.write_events(record)
    return Submitted(submitted.target_type, submitted.target_id, submitted.already, tuple(events))


# controlling ---------------------------------------------------------------------------------

def control(store: Store, target: str, action: str, priority: int | None = None) -> tuple[str, str, list]:
    """pause | resume | cancel | restart | delete a session or batch (by id or job_id), or give
    it a new `priority` (action "priority").

    Returns the target's type and id, and the events appended."""
    if action == "priority":
        check_priority(priority)

    def record(tx: Tx) -> tuple[str, str]:
        target_type, target_id = find_target(tx.conn, target)
        apply_control(tx, target_type, target_id, action, priority)
        return target_type, target_id

    (target_type, target_id), events = store.write_events(record)
    return target_type, target_id, events


def apply_control(tx: Tx, target_type: str, target_id: str, action: str, priority: int | None = None) -> None:
    if action == "priority":
        reprioritize(tx, target_type, target_id, priority)
    elif target_type == "session":
        control_session(tx, target_id, action)
    else:
        control_batch(tx, target_id, action)


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 1000:
        raise ValidationError(f"priority: {priority!r}; a whole number from 0 to 1000", [{"loc": "priority"}])
    return priority


def reprioritize(tx: Tx, target_type: str, target_id: str, priority: int | None) -> None:
    """A new priority for a session that has not ended, or for a batch and each of its items that
    has not: the next claim sees it (a running step is not touched). INVALID_TRANSITION once ended."""
    priority = check_priority(priority)
    if target_type == "session":
        session = tx.get("sessions", (target_id,))
        _check_reprioritize(session, "session", target_id)
        tx.emit("session", target_id, "session.reprioritized",
                {"session_id": target_id, "priority": priority, "previous": session["priority"]})
        return
    batch = tx.get("batches", (target_id,))
    _check_reprioritize(batch, "batch", target_id)
    tx.emit("batch", target_id, "batch.reprioritized",
            {"batch_id": target_id, "priority": priority, "previous": batch["priority"]})
    for item in tx.projection.children("items", target_id):
        session = tx.get("sessions", (item["session_id"],))
        if session is not None and session["status"] in ACTIVE and session["priority"] != priority:
            tx.emit("session", session["session_id"], "session.reprioritized",
                    {"session_id": session["session_id"], "priority": priority, "previous": session["priority"],
                     "batch_id": target_id})


def _check_reprioritize(row: dict | None, kind: str, target_id: str) -> None:
    if row is None:
        raise NotFound(f"no {kind} {target_id!r}")
    if row["status"] not in ACTIVE:  # a new priority changes nothing once it has ended
        raise InvalidTransition(f"{kind} {target_id} has ended ({row['status']}): a new priority would change "
                                "nothing; restart it first", current_state=row["status"])


def _check_session_control(session: dict | None, session_id: str, action: str, from_batch: bool = False) -> None:
    """NOT_FOUND or INVALID_TRANSITION unless `action` may be applied to this session now."""
    if session is None:
        raise NotFound(f"no session {session_id!r}")
    if session["batch_id"] and not from_batch and action in ("restart", "delete"):
        raise InvalidTransition(
            f"session {session_id} is item {session['item_index']} of batch {session['batch_id']}: "
            f"{action} the batch instead", current_state=session["status"])
    SESSION.dest(action, session["status"], started=session["started_at"] is not None)


def _check_batch_control(view, batch_id: str, action: str) -> list[dict | None]:
    """NOT_FOUND or INVALID_TRANSITION unless `action` may be applied to this batch now; its
    items' sessions."""
    batch = view.get("batches", (batch_id,))
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}")
    BATCH.dest(action, batch["status"], started=batch["started_at"] is not None)
    item_sessions = [view.get("sessions", (item["session_id"],)) for item in view.children("items", batch_id)]
    if action == "delete" and any(s and s["status"] == "running" for s in item_sessions):
        raise InvalidTransition(f"batch {batch_id} has running items: cancel it first", current_state=batch["status"])
    return item_sessions


def allowed_session_actions(session: dict) -> list[str]:
    """The controls this session (a row or report: status, started_at, batch_id) takes now, by the
    very checks a control meets."""
    def check(action: str) -> None:
        if action == "priority":
            _check_reprioritize(session, "session", session["session_id"])
        else:
            _check_session_control(session, session["session_id"], action)

    return _passing(check)


def allowed_batch_actions(batch: dict, item_statuses: list[str]) -> list[str]:
    """The controls this batch takes now, by the very checks a control meets."""
    def check(action: str) -> None:
        if action == "priority":
            _check_reprioritize(batch, "batch", batch["batch_id"])
            return
        BATCH.dest(action, batch["status"], started=batch.get("started_at") is not None)
        if action == "delete" and "running" in item_statuses:
            raise InvalidTransition("a batch with running items cannot be deleted", current_state=batch["status"])

    return _passing(check)


def _passing(check: Callable[[str], None]) -> list[str]:
    """The actions `check` lets through (it raises InvalidTransition for the others)."""
    allowed = []
    for action in ACTIONS:
        try:
            check(action)
        except InvalidTransition:
            continue
        allowed.append(action)
    return allowed


def control_session(tx: Tx, session_id: str, action: str, from_batch: bool = False) -> None:
    session = tx.get("sessions", (session_id,))
    _check_session_control(session, session_id, action, from_batch)
    if action == "cancel":
        ending.cancel_session(tx, session_id, session["run"])
    else:
        tx.emit("session", session_id, SESSION.event(action),
                {"session_id": session_id, "run": session["run"] + (action == "restart")})
    if action in ("cancel", "delete"):
        tx.conn.execute(leases.delete().where(leases.c.session_id == session_id))
    if action == "resume":  # paused while its last step finished: it completes now
        ending.complete_if_done(tx, session_id)


def control_batch(tx: Tx, batch_id: str, action: str) -> None:
    item_sessions = _check_batch_control(tx.projection, batch_id, action)
    batch = tx.get("batches", (batch_id,))
    if action == "cancel":
        ending.cancel_batch(tx, batch_id, batch["run"])
    else:
        tx.emit("batch", batch_id, BATCH.event(action), {"batch_id": batch_id, "run": batch["run"] + (action == "restart")})
    for session in item_sessions:
        if session and SESSION.allowed(action, session["status"]):
            control_session(tx, session["session_id"], action, from_batch=True)
