"""The one pure reducer: folds events into projection rows.

`apply(projection, event)` reads and writes rows only through the projection interface
(`get`, `put`, `delete`, `children`), so the live store (rows loaded from the database inside the
appending transaction), `engine rebuild` and `rebuild --verify` (rows in memory) share it.
Every status change goes through the state machines in `engine.machines`.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from engine.params import pin_of
from engine.machines import BATCH, ITEM, SESSION, STEP, TRIGGERS
from engine.store.events import Event, dumps

Row = dict[str, Any]


class Projection(Protocol):
    def get(self, table: str, key: tuple) -> Row | None: ...
    def put(self, table: str, row: Row) -> None: ...
    def delete(self, table: str, key: tuple) -> None: ...
    def children(self, table: str, parent_id: str) -> list[Row]: ...


class ReplayError(Exception):
    """The log does not fold: an event out of sequence or for an entity that does not exist."""


STREAM_ROWS = {"session": "sessions", "batch": "batches", "job": "jobs", "model": "models", "delivery": "deliveries"}


def stream_version(projection: Projection, stream_type: str, stream_id: str) -> int:
    row = projection.get(STREAM_ROWS[stream_type], (stream_id,))
    return row["last_seq"] if row else 0


def apply(projection: Projection, event: Event) -> None:
    """Fold one event into the projection."""
    handler = _HANDLERS.get(event.type)
    if handler is None:
        raise ReplayError(f"unknown event type {event.type}")
    expected = stream_version(projection, event.stream_type, event.stream_id) + 1
    if event.seq != expected:
        raise ReplayError(f"{event.stream_type} {event.stream_id}: seq {event.seq}, expected {expected}")
    handler(projection, event)


def _require(projection: Projection, table: str, key: tuple) -> Row:
    row = projection.get(table, key)
    if row is None:
        raise ReplayError(f"{table} {key} does not exist")
    return dict(row)


# sessions and steps -------------------------------------------------------------------------

def _session_created(p: Projection, e: Event) -> None:
    d = e.data
    steps = d["steps"]
    for index, step in enumerate(steps):
        p.put("steps", _fresh_step(e.stream_id, index, 1, step))
    session = {
        "session_id": e.stream_id, "job_id": d.get("job_id"), "batch_id": d.get("batch_id"),
        "item_index": d.get("item_index"), "workflow_id": d["workflow_id"],
        "status": "paused" if d.get("hold") else "pending", "run": 1, "current_step": 0,
        "total_steps": len(steps), "priority": d.get("priority", 0), "params": dumps(d["params"]),
        "steps": dumps(steps), "error_code": None, "error_message": None,
        "created_event": e.event_id or 0, "created_at": e.created_at, "started_at": None,
        "updated_at": e.created_at, "finished_at": None, "last_seq": e.seq,
        "device": pin_of(d["params"]), "model": str(d["params"].get("model") or ""),
        "notify": dumps(d["notify"]) if d.get("notify") else None, "owner": d.get("owner") or "default",
    }
    _set_ready(p, session)
    p.put("sessions", session)


def _fresh_step(session_id: str, index: int, run: int, step: dict) -> Row:
    return {
        "session_id": session_id, "step_index": index, "run": run, "step_type": step["type"],
        "domain": step["domain"], "status": "pending", "attempts": 0, "not_before": None,
        "started_at": None, "finished_at": None, "duration_s": None, "error_code": None,
        "error_message": None, "output": None, "group_key": step.get("group"), "recoveries": 0,
    }


def _set_ready(p: Projection, session: Row, step: Row | None = None) -> None:
    """The claim queue: a session is ready when it may run and its current step waits to run.
    `ready_at` is when (a retry's backoff); the runner claims the best ready session's step."""
    index = session["current_step"]
    if session["status"] in ("pending", "running") and index < session["total_steps"]:
        step = step if step is not None and step["step_index"] == index else p.get("steps", (session["session_id"], index))
        if step is not None and step["status"] == "pending":
            session["ready"], session["ready_at"] = 1, step["not_before"] or 0.0
            session["group_key"] = step.get("group_key")
            return
    session["ready"], session["ready_at"], session["group_key"] = 0, None, None


def _session_transition(p: Projection, e: Event) -> None:
    session = _require(p, "sessions", (e.stream_id,))
    trigger = _trigger(e.type)
    session["status"] = SESSION.dest(trigger, session["status"], started=session["started_at"] is not None)
    session["updated_at"] = e.created_at
    session["last_seq"] = e.seq
    if trigger == "start":
        session["started_at"] = e.created_at
    elif trigger == "complete":
        session["finished_at"] = e.created_at
        session["current_step"] = session["total_steps"]
    elif trigger in ("fail", "cancel"):
        session["finished_at"] = e.created_at
        session["error_code"] = e.data.get("code", "CANCELLED" if trigger == "cancel" else "STEP_FAILED")
        session["error_message"] = e.data.get("message")
        for step in p.children("steps", e.stream_id):
            if STEP.allowed("cancel", step["status"]):
                p.put("steps", {**step, "status": STEP.dest("cancel", step["status"]), "finished_at": e.created_at})
    elif trigger == "restart":
        session.update(run=e.data["run"], current_step=0, started_at=None, finished_at=None,
                       error_code=None, error_message=None)
        p.children("steps", e.stream_id)  # rows to replace are read first (a put of an unread row inserts)
        for index, step in enumerate(_loads(session["steps"])):
            p.put("steps", _fresh_step(e.stream_id, index, e.data["run"], step))
    elif trigger == "delete":
        for step in p.children("steps", e.stream_id):
            p.delete("steps", (e.stream_id, step["step_index"]))
        p.delete("sessions", (e.stream_id,))
        return
    _set_ready(p, session)
    p.put("sessions", session)


def _step_event(p: Projection, e: Event) -> None:
    session = _require(p, "sessions", (e.stream_id,))
    index = e.data["step_index"]
    step = _require(p, "steps", (e.stream_id, index))
    trigger = _trigger(e.type)
    step["status"] = STEP.dest(trigger, step["status"])
    if trigger == "claim":
        step.update(attempts=e.data["attempt"], started_at=e.created_at, finished_at=None, not_before=None)
        session["current_step"] = index
    elif trigger == "complete":
        step.update(finished_at=e.created_at, duration_s=e.data.get("duration_s"),
                    output=dumps(e.data.get("output", {})), error_code=None, error_message=None)
        session["current_step"] = index + 1
        if session["batch_id"]:
            _count_call(p, session["batch_id"], e.data.get("output") or {})
    elif trigger == "retry":
        step.update(not_before=e.data.get("not_before"), error_code=e.data.get("code"),
                    error_message=e.data.get("message"))
        if e.data.get("recovery"):  # taken back from a runner that died: not the step's failure
            step["recoveries"] = step.get("recoveries", 0) + 1
    elif trigger == "release":
        step["attempts"] = max(0, step["attempts"] - 1)
    elif trigger == "fail":
        step.update(finished_at=e.created_at, error_code=e.data.get("code"), error_message=e.data.get("message"))
    session["updated_at"] = e.created_at
    session["last_seq"] = e.seq
    p.put("steps", step)
    _set_ready(p, session, step)
    p.put("sessions", session)


# batches and items --------------------------------------------------------------------------

def _batch_created(p: Projection, e: Event) -> None:
    d = e.data
    p.put("batches", {
        "batch_id": e.stream_id, "job_id": d.get("job_id"), "status": "paused" if d.get("hold") else "pending",
        "run": 1, "priority": d.get("priority", 0), "config": dumps(d.get("config", {})),
        "total_items": len(d["items"]), "completed_items": 0, "failed_items": 0, "cancelled_items": 0,
        "created_at": e.created_at, "started_at": None, "updated_at": e.created_at, "finished_at": None,
        "last_seq": e.seq, "name": d.get("name") or "", "notify": dumps(d["notify"]) if d.get("notify") else None,
        "owner": d.get("owner") or "default",
        **_NO_CALLS,
    })
    for index, session_id in enumerate(d["items"]):
        p.put("items", {"batch_id": e.stream_id, "item_index": index, "session_id": session_id,
                        "status": "pending", "updated_at": e.created_at})


def _batch_transition(p: Projection, e: Event) -> None:
    batch = _require(p, "batches", (e.stream_id,))
    trigger = _trigger(e.type)
    batch["status"] = BATCH.dest(trigger, batch["status"], started=batch["started_at"] is not None)
    batch["updated_at"] = e.created_at
    batch["last_seq"] = e.seq
    if trigger == "start":
        batch["started_at"] = e.created_at
    elif trigger in ("complete", "fail", "cancel"):
        batch["finished_at"] = e.created_at
    elif trigger == "restart":
        batch.update(run=e.data["run"], completed_items=0, failed_items=0, cancelled_items=0,
                     started_at=None, finished_at=None, **_NO_CALLS)
        for item in p.children("items", e.stream_id):
            p.put("items", {**item, "status": "pending", "updated_at": e.created_at})
    elif trigger == "delete":
        for item in p.children("items", e.stream_id):
            p.delete("items", (e.stream_id, item["item_index"]))
        p.delete("batches", (e.stream_id,))
        return
    p.put("batches", batch)


# webhook deliveries (engine.notify) ---------------------------------------------------------

def _delivery_event(p: Projection, e: Event) -> None:
    """A delivery's life: created with the event it reports; each attempt sending (its lease: not
    due again until the send has had its time) and attempted (delivered, failed with its next
    attempt, or dead); retried by hand."""
    d = e.data
    if e.type == "delivery.created":
        p.put("deliveries", {
            "delivery_id": e.stream_id, "target_type": d["target_type"], "target_id": d["target_id"],
            "event_id": d["event_id"], "event_type": d["event_type"], "url": d["url"], "status": "pending",
            "attempts": 0, "retry_base": 0, "last_status": None, "last_error": None,
            "next_attempt_at": d["next_attempt_at"], "created_at": e.created_at, "updated_at": e.created_at,
            "delivered_at": None, "last_seq": e.seq})
        return
    delivery = _require(p, "deliveries", (e.stream_id,))
    delivery.update(updated_at=e.created_at, last_seq=e.seq)
    if e.type == "delivery.sending":
        delivery.update(attempts=d["attempt"], next_attempt_at=d["until"])
    elif e.type == "delivery.attempted":
        delivery.update(status=d["outcome"], last_status=d.get("status"), last_error=d.get("error"),
                        next_attempt_at=d.get("next_attempt_at"))
        if d["outcome"] == "delivered":
            delivery["delivered_at"] = e.created_at
    elif e.type == "delivery.retried":
        delivery.update(status="pending", next_attempt_at=d["next_attempt_at"], retry_base=delivery["attempts"])
    p.put("deliveries", delivery)


def _reprioritized(p: Projection, e: Event) -> None:
    """A new priority (session.reprioritized, batch.reprioritized): the next claim sees it."""
    table = "sessions" if e.stream_type == "session" else "batches"
    row = _require(p, table, (e.stream_id,))
    row.update(priority=e.data["priority"], updated_at=e.created_at, last_seq=e.seq)
    p.put(table, row)


_COUNTERS = {"completed": "completed_items", "failed": "failed_items", "cancelled": "cancelled_items"}
_NO_CALLS = {"total_calls": 0, "total_images": 0, "call_seconds": 0.0, "memory_peak": None, "last_call_id": None}


def _count_call(p: Projection, batch_id: str, output: dict) -> None:
    """BatchMetrics: an item's inference completion names its pipeline call. The completions of one
    call are recorded together, so a call is counted when its id differs from the last one seen."""
    data, images = output.get("data") or {}, output.get("images") or []
    if not data.get("call_id"):
        return
    batch = _require(p, "batches", (batch_id,))
    if data["call_id"] != batch["last_call_id"]:
        batch["total_calls"] += 1
        batch["call_seconds"] += float(data.get("group_seconds") or 0.0)
        batch["last_call_id"] = data["call_id"]
    batch["total_images"] += len(images)
    if data.get("peak_memory_bytes"):
        batch["memory_peak"] = max(batch["memory_peak"] or 0, int(data["peak_memory_bytes"]))
    p.put("batches", batch)


def _item_event(p: Projection, e: Event) -> None:
    batch = _require(p, "batches", (e.stream_id,))
    item = _require(p, "items", (e.stream_id, e.data["item_index"]))
    new_status = ITEM.dest(_trigger(e.type), item["status"])
    if item["status"] in _COUNTERS:
        batch[_COUNTERS[item["status"]]] -= 1
    if new_status in _COUNTERS:
        batch[_COUNTERS[new_status]] += 1
    item.update(status=new_status, updated_at=e.created_at)
    batch.update(updated_at=e.created_at, last_seq=e.seq)
    p.put("items", item)
    p.put("batches", batch)


# jobs and models ----------------------------------------------------------------------------

def _job_event(p: Projection, e: Event) -> None:
    d = e.data
    row = p.get("jobs", (e.stream_id,))
    base = dict(row) if row else {"job_key": e.stream_id, "created_at": e.created_at, "move_error": None}
    base.update(
        job_id=d.get("job_id"), status="accepted" if e.type == "job.received" else "rejected",
        file_name=d.get("file_name"), content_hash=d.get("content_hash"), target_type=d.get("target_type"),
        target_id=d.get("target_id"), error_code=d.get("code"), error_message=d.get("message"),
        file_identity=d.get("file_identity"), stored_as=d.get("stored_as"),
        updated_at=e.created_at, last_seq=e.seq,
    )
    p.put("jobs", base)


def _job_stranded(p: Projection, e: Event) -> None:
    """The job's file could not be moved out of the inbox: it stays there, skipped, and says why."""
    row = _require(p, "jobs", (e.stream_id,))
    row.update(move_error=e.data.get("message"), updated_at=e.created_at, last_seq=e.seq)
    p.put("jobs", row)


def _model_event(p: Projection, e: Event) -> None:
    d = e.data
    row = p.get("models", (e.stream_id,))
    base = dict(row) if row else {"model_key": e.stream_id, "loads": 0}
    loaded = e.type == "model.loaded"
    base.update(
        model_id=d["model_id"], runner_id=d.get("runner_id", ""), loaded=int(loaded),
        loads=base["loads"] + int(loaded), device=d.get("device"), file=d.get("file", base.get("file")),
        file_hash=d.get("file_hash", base.get("file_hash")), updated_at=e.created_at, last_seq=e.seq,
    )
    p.put("models", base)


def _model_noted(p: Projection, e: Event) -> None:
    """Something a runner saw of a model (compiled, its compile failed, measured): the event log
    keeps it; the models row only moves on."""
    d = e.data
    row = p.get("models", (e.stream_id,))
    base = dict(row) if row else {"model_key": e.stream_id, "model_id": d["model_id"],
                                  "runner_id": d.get("runner_id", ""), "loaded": 0, "loads": 0, "device": d.get("device"),
                                  "file": None, "file_hash": None}
    base.update(updated_at=e.created_at, last_seq=e.seq)
    p.put("models", base)


def _model_measured(p: Projection, e: Event) -> None:
    """A call's memory, per image, for its model, size and mode: later calls are sized from it."""
    d = e.data
    _model_noted(p, e)
    key = (d["model_id"], d["width"], d["height"], d["mode"])
    p.get("memory_profiles", key)  # read first: a put of an unread row inserts
    p.put("memory_profiles", {"model_id": d["model_id"], "width": d["width"], "height": d["height"], "mode": d["mode"],
                              "device": d.get("device"), "per_image_bytes": int(d["per_image_bytes"]),
                              "available_bytes": int(d["available_bytes"]), "call_images": int(d["call_images"]),
                              "updated_at": e.created_at})


def _trigger(event_type: str) -> str:
    return TRIGGERS[event_type.split(".", 1)[1]]


def _loads(text: str) -> Any:
    return json.loads(text)


_HANDLERS = {
    "session.created": _session_created,
    **{f"session.{verb}": _session_transition for verb in
       ("started", "paused", "resumed", "completed", "failed", "cancelled", "restarted", "deleted")},
    **{f"step.{verb}": _step_event for verb in ("claimed", "completed", "retried", "released", "failed")},
    "session.reprioritized": _reprioritized,
    "batch.created": _batch_created,
    "batch.reprioritized": _reprioritized,
    **{f"delivery.{verb}": _delivery_event for verb in ("created", "sending", "attempted", "retried")},
    **{f"batch.{verb}": _batch_transition for verb in
       ("started", "paused", "resumed", "completed", "failed", "cancelled", "restarted", "deleted")},
    **{f"item.{verb}": _item_event for verb in ("started", "completed", "failed", "cancelled", "restarted")},
    "job.received": _job_event,
    "job.rejected": _job_event,
    "job.stranded": _job_stranded,
    "model.loaded": _model_event,
    "model.unloaded": _model_event,
    "model.measured": _model_measured,
    "model.compiled": _model_noted,
    "model.compile_failed": _model_noted,
    "model.compile_started": _model_noted,
}


def event_types() -> list[str]:
    """Every event type the log may hold."""
    return sorted(_HANDLERS)
