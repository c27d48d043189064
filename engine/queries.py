"""The one read API. Every door (the CLI's `--json`, the stdio worker, the live view, the next
HTTP door) reads through these functions and returns the same shapes: a session report, a batch
report with its metrics, lists with filters and pagination, the runners, the events after an id,
and why a session waits. Writing is `engine.commands`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import select, text

from engine.errors import NotFound, ValidationError
from engine.machines import SESSION_STATUSES, TERMINAL
from engine.outbox.folders import Outbox
from engine.outbox.sheets import seed_of
from engine.run import fleet
from engine.run.claims import waited_ms
from engine.store import Event, Store
from engine.store.tables import batches, events, jobs, leases, sessions, steps
from engine.store.tables import deliveries as deliveries_table

SESSION_LIST = ("session_id, job_id, workflow_id, status, current_step, total_steps, progress, priority, created_at, "
                "error_code, owner")
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
    if report.get("status") in TERMINAL:
        return 0.0
    progress, started = report.get("progress") or 0.0, report.get("started_at")
    if progress <= 0 or not started:
        return None
    elapsed = waited_ms(started, time.time()) / 1000.0
    return round(elapsed * (1 - progress) / progress, 1)


# one batch -----------------------------------------------------------------------------------

def batch_report(store: Store, target_name: str) -> dict[str, Any]:
    """One batch (by id or job_id): its status row with metrics, its name and priority, and its items (an item
    that has not ended shows its session's status: paused, running)."""
    with store.read() as conn:
        report = _one(conn, "batch", target_name, "SELECT s.*, b.name, b.priority, b.owner, b.started_at FROM batch_status s JOIN batches b "
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
    if status and status not in SESSION_STATUSES:
        raise ValidationError(f"status: {status!r} is no session status; one of {', '.join(SESSION_STATUSES)}")
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
            f"SELECT s.*, b.name, b.owner FROM batch_status s JOIN batches b ON b.batch_id = s.batch_id {where} "
            "ORDER BY s.created_at DESC, s.batch_id LIMIT :limit OFFSET :offset"),
            {"status": status, **_page(limit, offset)}).mappings()]


def figures(store: Store) -> dict[str, Any]:
    """What /metrics shows of the store, in one read: sessions, batches and webhook deliveries by
    status, when the oldest pending session was submitted, the runners."""
    with store.read() as conn:
        return {"sessions": dict(conn.execute(text("SELECT status, count(*) FROM sessions GROUP BY status")).all()),
                "batches": dict(conn.execute(text("SELECT status, count(*) FROM batches GROUP BY status")).all()),
                "oldest_pending": conn.execute(text("SELECT min(created_at) FROM sessions "
                                                    "WHERE status = 'pending'")).scalar(),
                "deliveries": dict(conn.execute(text("SELECT status, count(*) FROM deliveries GROUP BY status")).all()),
                "runners": fleet.listing(conn)}


def nothing_left(store: Store) -> bool:
    """No step is running anywhere (each holds a lease) and none is waiting to run, a retry's
    backoff included (paused sessions wait for a user, not for a runner)."""
    with store.read() as conn:
        waiting = conn.execute(select(sessions.c.session_id).where(sessions.c.ready == 1).limit(1)).first()
        running = conn.execute(select(leases.c.session_id).limit(1)).first()
    return waiting is None and running is None


def ended_targets(store: Store) -> tuple[list[dict[str, Any]], list[str]]:
    """The sessions (id, run, batch, item) and the batch ids that have ended: what has a result file."""
    with store.read() as conn:
        ended = [dict(r) for r in conn.execute(
            select(sessions.c.session_id, sessions.c.run, sessions.c.batch_id, sessions.c.item_index)
            .where(sessions.c.status.in_(TERMINAL))).mappings()]
        ended_batches = [r.batch_id for r in conn.execute(select(batches.c.batch_id)
                                                            .where(batches.c.status.in_(TERMINAL)))]
    return ended, ended_batches


def attempt_state(store: Store, session_id: str, step_index: int) -> tuple[Any, dict | None, dict | None]:
    """A step's lease (attempt, run) if one is held, its row and its session's row, read in that
    order in one transaction (a completion deletes the lease and completes the step in one commit,
    so a lease found gone means the step read after it shows that completion, if any)."""
    with store.read() as conn:
        lease = conn.execute(select(leases.c.attempt, leases.c.run).where(
            leases.c.session_id == session_id, leases.c.step_index == step_index)).first()
        step = conn.execute(select(steps).where(steps.c.session_id == session_id,
                                                steps.c.step_index == step_index)).mappings().first()
        session = conn.execute(select(sessions).where(sessions.c.session_id == session_id)).mappings().first()
    return lease, dict(step) if step else None, dict(session) if session else None


def due_deliveries(store: Store, limit: int, now: float) -> list[str]:
    """The webhook deliveries due by `now`, the longest due first."""
    with store.read() as conn:
        return [r.delivery_id for r in conn.execute(
            select(deliveries_table.c.delivery_id)
            .where(deliveries_table.c.status == "pending", deliveries_table.c.next_attempt_at <= now)
            .order_by(deliveries_table.c.next_attempt_at).limit(limit))]


def files_taken(store: Store, identity: str, content_hash: str, name: str) -> tuple[dict | None, list[dict]]:
    """The jobs row of the very file with this identity, if it was taken; and the rows of files
    taken with this name and content that were moved (a taken file whose change time changed)."""
    with store.read() as conn:
        row = conn.execute(select(jobs).where(jobs.c.file_identity == identity)).mappings().first()
        if row is not None:
            return dict(row), []
        return None, [dict(r) for r in conn.execute(select(jobs).where(
            jobs.c.content_hash == content_hash, jobs.c.file_name == name, jobs.c.stored_as.is_not(None))).mappings()]


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
    return Event.from_row(row).as_dict()


def target_events(store: Store, target_name: str, after: int = 0, limit: int = MAX_PAGE * 10) -> dict[str, Any]:
    """The events of a session or batch (by id or job_id) after an event id, oldest first."""
    with store.read() as conn:
        target_type, target_id = find_target(conn, str(target_name))
        rows = conn.execute(select(events).where(events.c.stream_type == target_type, events.c.stream_id == target_id,
                                                 events.c.event_id > after)
                            .order_by(events.c.event_id).limit(limit)).all()
    return {"target_type": target_type, "target_id": target_id, "events": [_event(r) for r in rows]}


# webhook deliveries ----------------------------------------------------------------------------

DELIVERY_STATUSES = ("pending", "delivered", "dead")


def deliveries(store: Store, status: str | None = None, limit: int = 100, target: str | None = None) -> list[dict]:
    """Webhook deliveries, newest first (the webhook_deliveries view), of one status or target."""
    if status and status not in DELIVERY_STATUSES:
        raise ValidationError(f"status: {status!r}; one of {', '.join(DELIVERY_STATUSES)}")
    where = [c for c, given in (("status = :status", status), ("target_id = :target", target)) if given]
    with store.read() as conn:
        return [dict(r) for r in conn.execute(text(
            f"SELECT * FROM webhook_deliveries {'WHERE ' + ' AND '.join(where) if where else ''} "
            "ORDER BY created_at DESC, id DESC LIMIT :limit"),
            {"status": status, "target": target, **_page(limit, 0)}).mappings()]


# what the web page shows ---------------------------------------------------------------------

QUEUE_ROWS = 50  # of each list on the queue page; the counts say how many there are in all


def owner_status(store: Store) -> list[dict[str, Any]]:
    """Per owner: sessions running and pending (held and paused included), images and GPU-seconds
    today (the owner_status view)."""
    with store.read() as conn:
        return [dict(r) for r in conn.execute(text("SELECT * FROM owner_status ORDER BY owner")).mappings()]


def queue(store: Store, rows: int = QUEUE_ROWS, recent: int = 20, now: float | None = None,
          owners: dict | None = None) -> dict[str, Any]:
    """The queue as one read: the counts by status; running sessions with their live progress and
    who runs them; pending ones in the order they will be claimed (priority, then age; with
    `owners`, the [owners] table of a fair share, owners' turns among one priority), each with why
    it waits; paused (held) ones; and the sessions that ended last."""
    now = time.time() if now is None else now
    columns = ("s.session_id, s.job_id, s.batch_id, s.workflow_id, s.status, s.current_step, s.total_steps, "
               "s.priority, s.owner, s.device, s.model, s.created_at, s.started_at, s.finished_at, s.error_code, "
               "s.error_message, s.ready, s.ready_at")
    with store.read() as conn:
        totals = {status: n for status, n in conn.execute(text("SELECT status, count(*) FROM sessions GROUP BY status"))}
        running = [dict(r) for r in conn.execute(text(
            f"SELECT {columns}, l.progress AS step_progress, l.message, l.runner_id, st.step_type, st.domain "
            "FROM sessions s LEFT JOIN leases l ON l.session_id = s.session_id AND l.step_index = s.current_step "
            "LEFT JOIN steps st ON st.session_id = s.session_id AND st.step_index = s.current_step "
            "WHERE s.status = 'running' ORDER BY s.started_at LIMIT :rows"), {"rows": rows}).mappings()]
        pending = _pending(conn, columns, rows, owners)
        paused = [dict(r) for r in conn.execute(text(
            f"SELECT {columns} FROM sessions s WHERE s.status = 'paused' ORDER BY s.priority DESC, s.created_event "
            "LIMIT :rows"), {"rows": rows}).mappings()]
        ended = [dict(r) for r in conn.execute(text(
            f"SELECT {columns} FROM sessions s WHERE s.status IN ('completed', 'failed', 'cancelled') "
            "ORDER BY s.finished_at DESC, s.session_id DESC LIMIT :recent"), {"recent": recent}).mappings()]
        live_workers = fleet.worker_names(conn)
        progress = _progress_of(conn, [r["session_id"] for r in running])
        for row in running:
            row["progress"] = progress.get(row["session_id"], 0.0)
            held = fleet.lease_holder_state(conn, row["session_id"], row["current_step"], now)
            row["waiting"] = ("its runner is gone; a live runner takes the step back" if held == "waiting"
                              else None if held == "running" or row["ready"] == 0
                              else waiting_why(row, live_workers, now))
    for place, row in enumerate(pending, start=1):
        row["place"] = place
        row["waiting"] = waiting_why(row, live_workers, now, fair=owners is not None)
    for row in paused:
        row["waiting"] = "paused: resume it to run" if row["started_at"] else "held: resume it to start"
    return {"counts": {status: totals.get(status, 0) for status in SESSION_STATUSES}, "running": running,
            "pending": pending, "paused": paused, "ended": ended, "live_workers": sorted(set(live_workers)),
            "fair": owners is not None}


def _pending(conn, columns: str, rows: int, owners: dict | None) -> list[dict[str, Any]]:
    """The first `rows` pending sessions in claim order: ready ones first (by priority, then age;
    with a fair share, by engine.run.fairshare.claim_order over each owner's first `rows`, from the
    owners' tags as the claim reads them), then those not ready."""
    from engine.run import fairshare
    from engine.run.grouping import images_of

    if owners is None:
        return [dict(r) for r in conn.execute(text(
            f"SELECT {columns} FROM sessions s WHERE s.status = 'pending' "
            "ORDER BY s.ready DESC, s.priority DESC, s.created_event LIMIT :rows"), {"rows": rows}).mappings()]
    ready = [dict(r) for r in conn.execute(text(
        f"SELECT * FROM (SELECT {columns}, s.params, s.created_event, ROW_NUMBER() OVER (PARTITION BY s.owner "
        "ORDER BY s.priority DESC, s.created_event) AS nth FROM sessions s WHERE s.status = 'pending' "
        "AND s.ready = 1) ranked WHERE nth <= :rows ORDER BY priority DESC, created_event"), {"rows": rows}).mappings()]
    tags = dict(conn.execute(text("SELECT owner, finish FROM owner_shares")).all())
    clock = tags.pop(fairshare.CLOCK, 0.0)
    queued = [(r["owner"], r["priority"], fairshare.cost_of(images_of(json.loads(r.pop("params") or "{}"))))
              for r in ready]
    weights = {o: fairshare.limits_of(owners, o).weight for o, _, _ in queued}
    chosen = [ready[i] for i in fairshare.claim_order(queued, tags, clock, weights, rows)]
    for row in chosen:
        del row["nth"], row["created_event"]
    if len(chosen) < rows:
        chosen += [dict(r) for r in conn.execute(text(
            f"SELECT {columns} FROM sessions s WHERE s.status = 'pending' AND s.ready = 0 "
            "ORDER BY s.priority DESC, s.created_event LIMIT :rows"), {"rows": rows - len(chosen)}).mappings()]
    return chosen


def waiting_why(row: dict[str, Any], live_workers: list[str], now: float, fair: bool = False) -> str:
    """Why a pending session (or a running one between steps) has not been claimed yet: its retry's
    backoff, no runner for it, or its place in the queue."""
    from engine.run.affinity import waiting_reason

    if row.get("ready") and row.get("ready_at") and row["ready_at"] > now:
        return f"retrying in {row['ready_at'] - now:.0f} s (backoff after a failed attempt)"
    reason = waiting_reason(row.get("device") or "", live_workers)
    if reason:
        return reason
    if not row.get("place"):
        return "queued for its next step"
    return f"queued: #{row['place']} by priority, then owners' turns" if fair else \
        f"queued: #{row['place']} by priority and age"


def _progress_of(conn, session_ids: list[str]) -> dict[str, float]:
    """session_status's weighted progress of these sessions."""
    if not session_ids:
        return {}
    marks = ", ".join(f":s{n}" for n in range(len(session_ids)))
    return {r.session_id: r.progress for r in conn.execute(
        text(f"SELECT session_id, progress FROM session_status WHERE session_id IN ({marks})"),
        {f"s{n}": sid for n, sid in enumerate(session_ids)})}


def attempts(session_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A session's step attempts, in order, folded from its events: where each ran (runner,
    worker, device), when, for how long, how it ended (completed, retried, failed, released,
    taken back) with its error code, and the call it shared (call_id, images and sessions in it)."""
    out: list[dict[str, Any]] = []
    open_attempts: dict[tuple[int, int, int], dict[str, Any]] = {}
    for event in session_events:
        data, kind = event["data"], event["type"]
        if not kind.startswith("step.") or "step_index" not in data:
            continue
        key = (data.get("run", 1), data["step_index"], data.get("attempt", 0))
        if kind == "step.claimed":
            entry = {"run": key[0], "step_index": key[1], "attempt": key[2], "runner_id": data.get("runner_id"),
                     "worker": data.get("worker"), "device": data.get("device"), "started_at": event["created_at"],
                     "ended_at": None, "outcome": "running", "duration_s": None, "error_code": None,
                     "error_message": None, "call_id": None, "call_images": None, "call_sessions": None}
            open_attempts[key] = entry
            out.append(entry)
            continue
        entry = open_attempts.pop(key, None)
        if entry is None:
            continue
        entry["ended_at"] = event["created_at"]
        entry["outcome"] = {"step.completed": "completed", "step.failed": "failed", "step.retried": "retried",
                            "step.released": "released"}.get(kind, kind.split(".", 1)[1])
        entry["error_code"], entry["error_message"] = data.get("code"), data.get("message")
        if kind == "step.completed":
            entry["duration_s"] = data.get("duration_s")
            record = (data.get("output") or {}).get("data") or {}
            for field in ("call_id", "call_images", "call_sessions"):
                entry[field] = record.get(field)
    return out


def session_timeline(store: Store, target_name: str) -> list[dict[str, Any]]:
    """The attempts of a session's steps (see `attempts`), with each step's type and domain."""
    found = target_events(store, target_name)
    with store.read() as conn:
        kinds = {r.step_index: (r.step_type, r.domain) for r in conn.execute(
            text("SELECT step_index, step_type, domain FROM steps WHERE session_id = :id"), {"id": found["target_id"]})}
    timeline = attempts(found["events"])
    for entry in timeline:
        entry["step_type"], entry["domain"] = kinds.get(entry["step_index"], ("?", "?"))
    return timeline


def call_members(store: Store, call_id: str) -> list[dict[str, Any]]:
    """The sessions whose images one pipeline call made (a coalesced call serves several)."""
    if not call_id.isalnum():
        return []
    with store.read() as conn:
        rows = [dict(r) for r in conn.execute(text(
            "SELECT st.session_id, st.step_index, st.output, s.job_id, s.status FROM steps st JOIN sessions s "
            "ON s.session_id = st.session_id WHERE st.output LIKE :pattern ORDER BY st.session_id"),
            {"pattern": f"%{call_id}%"}).mappings()]
    members = []
    for row in rows:  # the LIKE finds candidates; the output's own call_id decides
        if (json.loads(row.pop("output") or "{}").get("data") or {}).get("call_id") == call_id:
            members.append(row)
    return members


def gallery(store: Store, outbox: Outbox, limit: int = 48, after: tuple[str, str, int] | None = None,
            job_id: str | None = None, contains: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Published images, newest first, `limit` at a time: those of completed sessions (by the
    time they finished, then each session's images in order), optionally of one job_id, one model,
    or with a prompt containing some text. Each image: its session, its number, the session's
    workflow, model, prompt and seed, and its file name. `next` is the cursor of the page after
    (finished_at, session_id, the first image number still to show), None after the last page."""
    _page(limit, 0)
    where = ["status = 'completed'"]
    values: dict[str, Any] = {"rows": limit + 1}
    if job_id:
        where.append("job_id = :job")
        values["job"] = job_id
    if model:
        where.append("model = :model")
        values["model"] = model
    if contains and contains.isascii():  # a prefilter; the prompt itself decides below
        where.append("lower(params) LIKE :contains ESCAPE '\\'")
        escaped = contains.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        values["contains"] = f"%{json.dumps(escaped)[1:-1]}%"
    images: list[dict[str, Any]] = []
    # Where to go on from: the cursor's session itself, from its image number (inclusive); once
    # a page of rows is used up, after its last session (exclusive).
    start_at, inclusive = after, after is not None
    while True:
        clause = list(where)
        if start_at is not None:
            clause.append("(finished_at < :before OR (finished_at = :before AND session_id "
                          f"{'<=' if inclusive else '<'} :before_id))")
            values.update(before=start_at[0], before_id=start_at[1])
        with store.read() as conn:
            rows = [dict(r) for r in conn.execute(text(
                "SELECT session_id, job_id, batch_id, item_index, run, workflow_id, model, params, finished_at "
                f"FROM sessions WHERE {' AND '.join(clause)} ORDER BY finished_at DESC, session_id DESC LIMIT :rows"),
                values).mappings()]
        for row in rows:
            first = start_at[2] if inclusive and (row["finished_at"], row["session_id"]) == tuple(start_at[:2]) else 0
            params = json.loads(row["params"])
            names: list[str] = []
            if not contains or contains.lower() in str(params.get("prompt", "")).lower():
                try:
                    names = json.loads((outbox.dir_of(row) / "result.json").read_text()).get("images", [])
                except (OSError, ValueError):
                    names = []  # its result.json is still being written: on a later look
            for number in range(first, len(names)):
                if len(images) == limit:
                    return {"images": images, "next": [row["finished_at"], row["session_id"], number]}
                images.append({"session_id": row["session_id"], "number": number, "job_id": row["job_id"],
                               "workflow_id": row["workflow_id"], "model": row["model"] or params.get("model"),
                               "prompt": params.get("prompt", ""), "name": names[number],
                               "seed": seed_of(names[number]) if seed_of(names[number]) is not None
                               else params.get("seed"),
                               "finished_at": row["finished_at"]})
        if len(rows) <= limit:
            return {"images": images, "next": None}
        start_at, inclusive = (rows[-1]["finished_at"], rows[-1]["session_id"], 0), False
