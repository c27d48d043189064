"""The one read API. Every door (the CLI's `--json`, the stdio worker, the live view, the next
HTTP door) reads through these functions and returns the same shapes: a session report, a batch
report with its metrics, lists with filters and pagination, the runners, the events after an id,
and why a session waits. Writing is `engine.commands`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import func, select, text

from engine.errors import NotFound, ValidationError
from engine.machines import RUN_STATES
from engine.outbox.folders import Outbox
from engine.run import fleet
from engine.run.claims import waited_ms
from engine.store import Store
from engine.store.tables import batches, events, jobs, sessions

ENDED = ("completed", "failed", "cancelled")
SESSION_LIST = ("session_id, job_id, workflow_id, status, current_step, total_steps, progress, priority, created_at, "
                "error_code")
MAX_PAGE = 10000


def find_target(conn, target: str) -> tuple[str, str]:
    """(session | batch, id) of a session id, batch id or accepted job_id."""
    if conn.execute(select(sessions.c.session_id).where(sessions.c.session_id == target)).first():
        return "session", target
    if conn.execute(select(batches.c.batch_id).where(batches.c.batch_id == target)).first():
        return "batch", target
    row = conn.execute(select(jobs.c.target_type, jobs.c.target_id)
                       .where(jobs.c.job_id == target, jobs.c.status == "accepted",
                              jobs.c.target_type.in_(("session", "batch")))).first()
    if row:
        return row.target_type, row.target_id
    raise NotFound(f"no session, batch or job_id {target!r}")


def target(store: Store, name: str) -> tuple[str, str]:
    with store.read() as conn:
        return find_target(conn, name)


def _one(conn, what: str, target_name: str, sql: str) -> dict[str, Any]:
    """The row `sql` finds for this id or job_id, else NOT_FOUND."""
    row = conn.execute(text(sql), {"id": str(target_name)}).mappings().first()
    if row is None:
        raise NotFound(f"no {what} {target_name!r}")
    return dict(row)


# one session ---------------------------------------------------------------------------------

def session_report(store: Store, outbox: Outbox, target_name: str) -> dict[str, Any]:
    """One session (by id or job_id): its status row, params, steps, what it is doing now, why it
    waits (when stuck), its outbox folder, its images and an estimate of the seconds left."""
    with store.read() as conn:
        report = _one(conn, "session", target_name, "SELECT s.*, l.message AS activity FROM session_status s "
                      "LEFT JOIN leases l ON l.session_id = s.session_id AND l.step_index = s.current_step "
                      "WHERE s.session_id = :id OR s.job_id = :id")
        report["steps"] = [dict(r) for r in conn.execute(text(
            "SELECT step_index, step_type, domain, status, attempts, started_at, finished_at, error_code "
            "FROM step_status WHERE session_id = :id ORDER BY step_index"), {"id": report["session_id"]}).mappings()]
        extra = conn.execute(select(sessions.c.params, sessions.c.run, sessions.c.batch_id, sessions.c.item_index)
                             .where(sessions.c.session_id == report["session_id"])).one()
        report["params"] = json.loads(extra.params)
        report["run"], report["batch_id"], report["item_index"] = extra.run, extra.batch_id, extra.item_index
        report["waiting"] = fleet.why_waiting(conn, report["session_id"], report["status"], report["current_step"],
                                              report["params"])
    if report["waiting"]:
        for step in report["steps"]:
            if step["status"] == "running":
                step["status"] = "waiting for a runner"
    report["domains"] = {s["domain"]: s["status"] for s in report["steps"]}
    report["error"] = ({"code": report["error_code"], "message": report["error_message"]}
                       if report.get("error_code") else None)
    report["estimated_completion_seconds"] = seconds_left(report)
    folder = outbox.dir_of(report)
    report["outbox"] = str(folder)
    try:
        result = json.loads((folder / "result.json").read_text())
        report["images"] = [str(folder / name) for name in result.get("images", [])]
    except (OSError, ValueError):
        report["images"] = []
    return report


def seconds_left(report: dict[str, Any]) -> float | None:
    """Seconds left at the rate so far (None before there is a rate to go by)."""
    if report.get("status") in ENDED:
        return 0.0
    progress, started = report.get("progress") or 0.0, report.get("started_at")
    if progress <= 0 or not started:
        return None
    elapsed = waited_ms(started, time.time()) / 1000.0
    return round(elapsed * (1 - progress) / progress, 1)


# one batch -----------------------------------------------------------------------------------

def batch_report(store: Store, target_name: str) -> dict[str, Any]:
    """One batch (by id or job_id): its status row with metrics, its name, and its items (an item
    that has not ended shows its session's status: paused, running)."""
    with store.read() as conn:
        report = _one(conn, "batch", target_name, "SELECT s.*, b.name FROM batch_status s JOIN batches b "
                      "ON b.batch_id = s.batch_id WHERE s.batch_id = :id OR s.job_id = :id")
        report["items"] = [dict(r) for r in conn.execute(text(
            "SELECT i.item_index, i.session_id, CASE WHEN i.status IN ('pending', 'running') "
            "AND s.status IS NOT NULL THEN s.status ELSE i.status END AS status, "
            "s.current_step, s.total_steps, s.error_code FROM items i LEFT JOIN sessions s "
            "ON s.session_id = i.session_id WHERE i.batch_id = :id ORDER BY i.item_index"),
            {"id": report["batch_id"]}).mappings()]
    return report


# lists ---------------------------------------------------------------------------------------

def _page(limit: int, offset: int) -> dict[str, int]:
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit: {limit}; between 1 and {MAX_PAGE}")
    if offset < 0:
        raise ValidationError(f"offset: {offset}; 0 or more")
    return {"limit": limit, "offset": offset}


def list_sessions(store: Store, status: str | None = None, limit: int = 100, offset: int = 0,
                  batch_id: str | None = None, job_id: str | None = None, workflow: str | None = None,
                  after: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Sessions, newest first, optionally of one status, batch, job_id or workflow; a page starts
    at `offset`, or (keyset, stable while sessions are added) after the (created_at, session_id)
    of the last row of the page before."""
    if status and status not in RUN_STATES[:-1]:
        raise ValidationError(f"status: {status!r} is no session status; one of {', '.join(RUN_STATES[:-1])}")
    filters = {"status = :status": status, "batch_id = :batch": batch_id, "job_id = :job": job_id,
               "workflow_id = :workflow": workflow}
    where = [clause for clause, given in filters.items() if given]
    if after is not None:
        where.append("(created_at < :before OR (created_at = :before AND session_id < :before_id))")
    sql = (f"SELECT {SESSION_LIST} FROM session_status {'WHERE ' + ' AND '.join(where) if where else ''} "
           "ORDER BY created_at DESC, session_id DESC LIMIT :limit OFFSET :offset")
    values = {"status": status, "batch": batch_id, "job": job_id, "workflow": workflow,
              "before": after[0] if after else None, "before_id": after[1] if after else None}
    with store.read() as conn:
        return [dict(r) for r in conn.execute(text(sql), {**values, **_page(limit, offset)}).mappings()]


def list_batches(store: Store, limit: int = 100, offset: int = 0, status: str | None = None) -> list[dict[str, Any]]:
    """Batches, newest first: every column of batch_status, and the name."""
    where = "WHERE s.status = :status" if status else ""
    with store.read() as conn:
        return [dict(r) for r in conn.execute(text(
            f"SELECT s.*, b.name FROM batch_status s JOIN batches b ON b.batch_id = s.batch_id {where} "
            "ORDER BY s.created_at DESC, s.batch_id LIMIT :limit OFFSET :offset"),
            {"status": status, **_page(limit, offset)}).mappings()]


def counts(store: Store) -> dict[str, int]:
    """How many sessions are in each status."""
    with store.read() as conn:
        return {status: n for status, n in conn.execute(text("SELECT status, count(*) FROM session_status "
                                                             "GROUP BY status"))}


def active_sessions(store: Store, limit: int = 15) -> list[dict[str, Any]]:
    """Running, pending and paused sessions (running first, then by priority and age), with the
    current step's type and activity, for a live view; `waiting` when its runner is gone."""
    with store.read() as conn:
        rows = [dict(r) for r in conn.execute(text(
            "SELECT s.session_id, s.job_id, s.workflow_id, s.status, s.current_step, s.total_steps, s.progress, "
            "st.step_type, l.message, st.status AS step_status, ss.params "
            "FROM session_status s LEFT JOIN steps st ON st.session_id = s.session_id AND st.step_index = s.current_step "
            "LEFT JOIN leases l ON l.session_id = s.session_id AND l.step_index = s.current_step "
            "JOIN sessions ss ON ss.session_id = s.session_id "
            "WHERE s.status IN ('running', 'pending', 'paused') ORDER BY s.status = 'running' DESC, s.priority DESC, "
            "s.created_at LIMIT :limit"), {"limit": limit}).mappings()]
        for row in rows:
            row["params"] = json.loads(row["params"])
            row["waiting"] = row["step_status"] == "running" and \
                fleet.lease_holder_state(conn, row["session_id"], row["current_step"]) == "waiting"
    return rows


def runners(store: Store) -> list[dict[str, Any]]:
    """The runners that registered with this database (one whose process is gone shows as gone)."""
    with store.read() as conn:
        return fleet.listing(conn)


# events --------------------------------------------------------------------------------------

def _event(row) -> dict[str, Any]:
    return {"event_id": row.event_id, "stream_type": row.stream_type, "stream_id": row.stream_id, "seq": row.seq,
            "type": row.type, "data": json.loads(row.data), "created_at": row.created_at}


def target_events(store: Store, target_name: str, after: int = 0, limit: int = MAX_PAGE * 10) -> dict[str, Any]:
    """The events of a session or batch (by id or job_id) after an event id, oldest first."""
    with store.read() as conn:
        target_type, target_id = find_target(conn, str(target_name))
        rows = conn.execute(select(events).where(events.c.stream_type == target_type, events.c.stream_id == target_id,
                                                 events.c.event_id > after)
                            .order_by(events.c.event_id).limit(limit)).all()
    return {"target_type": target_type, "target_id": target_id, "events": [_event(r) for r in rows]}


def events_after(store: Store, after: int, limit: int = 1000) -> list[dict[str, Any]]:
    """Every event committed after this id, oldest first (what subscribers are pushed)."""
    with store.read() as conn:
        rows = conn.execute(select(events).where(events.c.event_id > after)
                            .order_by(events.c.event_id).limit(limit)).all()
    return [_event(r) for r in rows]


def newest_event_id(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.max(events.c.event_id))).scalar() or 0)
