"""The native API under /v1: jobs, sessions, batches, events (Server-Sent Events), the catalogue
and the runners. The same submit path and the same reports as the inbox, the CLI and the stdio
worker: a session here is `engine session ID --json`."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from engine import queries
from engine.doors.http.shared import control, idempotency_key, save_upload, submit, target_or_404
from engine.errors import NotFound, ValidationError
from engine.ingest.jobs import ACTIONS, SCHEDULERS, job_schema
from engine.machines import RUN_STATES
from engine.outbox.thumbs import make_thumbnail

CONTROLS = tuple(action for action in ACTIONS if action != "delete")


class NewPriority(BaseModel):
    priority: int = Field(ge=0, le=1000, description="0 to 1000; higher runs first")


def router(engine, stopping, writes) -> APIRouter:
    api = APIRouter(prefix="/v1")
    hub = EventHub(engine)

    def links(kind: str, target_id: str) -> dict[str, str]:
        plural = "sessions" if kind == "session" else "batches"
        return {"self": f"/v1/{plural}/{target_id}", "events": f"/v1/events?{kind}={target_id}"}

    @api.post("/jobs", status_code=201, summary="Submit a job file's JSON (a session, a batch or a control)")
    def post_job(job: dict[str, Any], idempotency: str | None = Header(None, alias="Idempotency-Key")):
        done = submit(engine, writes, job, idempotency_key(idempotency), "http")
        if done.target_type == "control":
            return JSONResponse({"target_id": done.target_id, "status": "accepted"}, status_code=200)
        report = (queries.session_report(engine.store, engine.outbox, done.target_id) if done.target_type == "session"
                  else queries.batch_report(engine.store, done.target_id))
        body = {f"{done.target_type}_id": done.target_id, "job_id": report["job_id"], "status": report["status"],
                "already_submitted": done.already, "links": links(done.target_type, done.target_id)}
        return JSONResponse(body, status_code=200 if done.already else 201)

    # sessions ------------------------------------------------------------------------------

    @api.get("/sessions", summary="Sessions, newest first, a page at a time")
    def get_sessions(status: str | None = None, job_id: str | None = None, workflow: str | None = None,
                     batch: str | None = None, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
        after = _cursor(cursor)
        rows = queries.list_sessions(engine.store, status=status, limit=limit + 1, batch_id=batch, job_id=job_id,
                                     workflow=workflow, after=after)
        more = len(rows) > limit
        rows = rows[:limit]
        following = _make_cursor(rows[-1]) if more and rows else None
        return {"sessions": rows, "next_cursor": following}

    @api.get("/sessions/{session_id}", summary="One session: the report `engine session ID --json` gives")
    def get_session(session_id: str):
        return queries.session_report(engine.store, engine.outbox, session_id)

    @api.get("/sessions/{session_id}/images/{number}", summary="A session's image (a PNG with its parameters)")
    def get_image(session_id: str, number: int):
        report = queries.session_report(engine.store, engine.outbox, session_id)
        if not 0 <= number < len(report["images"]):
            raise NotFound(f"session {report['session_id']} has {len(report['images'])} image(s); no image {number}")
        return FileResponse(report["images"][number], media_type="image/png")

    @api.get("/sessions/{session_id}/images/{number}/thumbnail",
             summary="A session's image as a small WebP (made when published, or now)")
    def get_thumbnail(session_id: str, number: int):
        report = queries.session_report(engine.store, engine.outbox, session_id)
        if not 0 <= number < len(report["images"]):
            raise NotFound(f"session {report['session_id']} has {len(report['images'])} image(s); no image {number}")
        thumb = make_thumbnail(Path(report["images"][number]))
        return FileResponse(thumb, media_type="image/webp", headers={"Cache-Control": "private, max-age=86400"})

    @api.post("/uploads", status_code=201, summary="An init or mask image (the body, or multipart `file`); "
              "answers the path a job names it by")
    async def post_upload(request: Request):
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ValidationError("multipart: send the image as the field `file`", [{"loc": "file"}])
            data = await upload.read()
        else:
            data = await request.body()
        if not data:
            raise ValidationError("the body is empty: send the image's bytes", [{"loc": "body"}])
        path = await run_in_threadpool(save_upload, engine, data, "file")
        return {"path": path}

    @api.get("/schema", summary="The JSON Schema of a job file (`engine schema`)")
    def get_schema():
        return job_schema()

    # batches -------------------------------------------------------------------------------

    @api.get("/batches", summary="Batches, newest first")
    def get_batches(status: str | None = None, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
        return {"batches": queries.list_batches(engine.store, limit=limit, offset=offset, status=status)}

    @api.get("/batches/{batch_id}", summary="One batch with its items and metrics (`engine batch ID --json`)")
    def get_batch(batch_id: str):
        return queries.batch_report(engine.store, batch_id)

    @api.get("/batches/{batch_id}/contact-sheet", summary="The batch's contact sheet (PNG)")
    def get_contact_sheet(batch_id: str):
        report = queries.batch_report(engine.store, batch_id)
        sheet = engine.outbox.batch_dir(report["batch_id"]) / "contact-sheet.png"
        if not sheet.is_file():
            raise NotFound(f"batch {report['batch_id']} has no contact sheet yet (it is made when the batch ends)")
        return FileResponse(sheet, media_type="image/png")

    for kind in ("session", "batch"):
        _control_routes(api, engine, writes, kind)

    # events --------------------------------------------------------------------------------

    @api.get("/events", summary="The event log as Server-Sent Events (id: the event id; Last-Event-ID resumes)")
    async def get_events(request: Request, session: str | None = None, batch: str | None = None,
                         job: str | None = None, after: int | None = None,
                         last_event_id: str | None = Header(None, alias="Last-Event-ID")):
        streams = await run_in_threadpool(_streams, engine, session, batch, job)
        return StreamingResponse(_event_stream(engine, hub, request, streams, _start(after, last_event_id), stopping),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # the catalogue -------------------------------------------------------------------------

    @api.get("/workflows", summary="The workflow templates")
    def get_workflows():
        return {"workflows": [{"id": w.id, "description": w.description, "steps": len(w.steps)}
                              for w in engine.intake.workflows.values()]}

    @api.get("/models", summary="The registered models")
    def get_models():
        return {"models": [{"id": e.id, "kind": e.kind, "family": e.family, "format": e.format}
                           for e in engine.models.entries().values()]}

    @api.get("/runners", summary="The runners registered with this database")
    def get_runners():
        return {"runners": queries.runners(engine.store)}

    @api.get("/capabilities", summary="What this engine takes: workflows, schedulers, models, limits, actions")
    def get_capabilities():
        return {"workflows": sorted(engine.intake.workflows), "schedulers": list(SCHEDULERS),
                "models": [e.id for e in engine.models.entries().values()],
                "limits": dict(engine.config.values["limits"]), "actions": list(ACTIONS),
                "session_statuses": list(RUN_STATES[:-1])}

    return api


def _control_routes(api: APIRouter, engine, writes, kind: str) -> None:
    """POST /v1/{sessions|batches}/{id}/{action} and DELETE /v1/{sessions|batches}/{id}."""
    plural = "sessions" if kind == "session" else "batches"

    @api.post(f"/{plural}/{{target}}/priority", summary=f"Give a {kind} a new priority (the next claim sees it)",
              name=f"priority_{kind}")
    def priority_one(target: str, body: NewPriority):
        return control(engine, writes, target_or_404(engine, target, kind), "priority", body.priority)

    @api.post(f"/{plural}/{{target}}/{{action}}", summary=f"pause, resume, cancel or restart a {kind}",
              name=f"control_{kind}")
    def control_one(target: str, action: str):
        return _control(engine, writes, target_or_404(engine, target, kind), action)

    @api.delete(f"/{plural}/{{target}}", summary=f"Remove a {kind} from the status tables (events are kept)",
                name=f"delete_{kind}")
    def delete_one(target: str):
        return _control(engine, writes, target_or_404(engine, target, kind), "delete")


def _control(engine, writes, target: str, action: str) -> dict[str, Any]:
    if action not in ACTIONS or action == "priority":
        raise NotFound(f"no action {action!r}; one of {', '.join(CONTROLS)} (POST), or DELETE")
    return control(engine, writes, target, action)


def _cursor(cursor: str | None) -> tuple[str, str] | None:
    if not cursor:
        return None
    try:
        created_at, session_id = json.loads(base64.urlsafe_b64decode(cursor.encode()).decode())
        return str(created_at), str(session_id)
    except (ValueError, TypeError):
        raise ValidationError("cursor: not one this server gave (take next_cursor as it is)",
                              [{"loc": "cursor"}]) from None


def _make_cursor(row: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps([row["created_at"], row["session_id"]]).encode()).decode()


def _start(after: int | None, last_event_id: str | None) -> int | None:
    """Where a stream starts: after Last-Event-ID (a reconnect), else after `after`, else now."""
    if last_event_id is not None:
        try:
            return int(last_event_id)
        except ValueError:
            raise ValidationError("Last-Event-ID: an event id this stream sent", [{"loc": "Last-Event-ID"}]) from None
    return after


def _streams(engine, session: str | None, batch: str | None, job: str | None) -> set[str] | None:
    """The stream ids a subscriber asked for (None: every stream)."""
    wanted: set[str] = set()
    if session:
        wanted.add(target_or_404(engine, session, "session"))
    if batch:
        batch_id = target_or_404(engine, batch, "batch")
        report = queries.batch_report(engine.store, batch_id)
        wanted.update([batch_id, *(item["session_id"] for item in report["items"])])
    if job:
        wanted.add(queries.target(engine.store, job)[1])
    return wanted or None


class EventHub:
    """One reader of the event log for every subscriber of this process: it polls the log (and the
    running steps' progress) while anyone listens and hands each new event to every subscriber's
    queue, so a hundred subscribers cost one query, not a hundred."""

    EVERY = 0.05  # seconds between looks at the log
    PROGRESS_EVERY = 10  # looks between looks at the running steps' progress

    def __init__(self, engine) -> None:
        self.engine = engine
        self.queues: set[asyncio.Queue] = set()
        self.last: int | None = None
        self.task: asyncio.Task | None = None

    async def subscribe(self) -> tuple[asyncio.Queue, int]:
        """A queue of what comes after the returned event id."""
        if self.last is None:
            self.last = await run_in_threadpool(queries.newest_event_id, self.engine.store)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.add(queue)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        return queue, self.last

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.queues.discard(queue)

    async def _run(self) -> None:
        tick = 0
        while self.queues:
            try:
                found = await run_in_threadpool(queries.events_after, self.engine.store, self.last, 1000)
                progress = (await run_in_threadpool(_progress, self.engine)
                            if tick % self.PROGRESS_EVERY == 0 else None)
            except Exception:  # the database's trouble: the next look tries again
                found, progress = [], None
            for event in found:
                self.last = event["event_id"]
                framed = (event, _frame(event))  # written once, for every subscriber
                for queue in list(self.queues):
                    queue.put_nowait(("event", framed))
            if progress is not None:
                for queue in list(self.queues):
                    queue.put_nowait(("progress", progress))
            tick += 1
            if len(found) < 1000:
                await asyncio.sleep(self.EVERY)


def _progress(engine) -> dict[str, tuple]:
    """The live progress of running steps (from their leases)."""
    return {row["session_id"]: (row["current_step"], row["progress"], row["message"])
            for row in queries.active_sessions(engine.store, limit=1000) if row["status"] == "running"}


def _frame(event: dict[str, Any]) -> str:
    return f"id: {event['event_id']}\nevent: {event['type']}\ndata: {json.dumps(event, default=str)}\n\n"


async def _event_stream(engine, hub: EventHub, request: Request, streams: set[str] | None, start: int | None,
                        stopping):
    """Every event after `start` in order, as `id:`/`event:`/`data:` frames (what the log held
    before, then what the hub hands on, each once), and the running steps' progress as
    `event: progress` frames (no id: a reconnect does not skip events)."""
    queue, live_from = await hub.subscribe()
    sent = live_from if start is None else start
    shown: dict[str, tuple] = {}
    try:
        yield ": engine events\n\n"
        while start is not None and sent < live_from:  # the backlog, read from the log
            found = await run_in_threadpool(queries.events_after, engine.store, sent, 1000)
            for event in found:
                sent = event["event_id"]
                if streams is None or event["stream_id"] in streams:
                    yield _frame(event)
            if len(found) < 1000:
                break
        quiet = 0.0
        while not stopping.event.is_set() and not await request.is_disconnected():
            try:
                kind, value = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                quiet += 1.0
                if quiet >= 15:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                continue
            if kind == "event":
                event, frame = value
                if event["event_id"] <= sent:
                    continue  # read with the backlog already
                sent = event["event_id"]
                if streams is None or event["stream_id"] in streams:
                    yield frame
                continue
            for session_id, now in value.items():
                if (streams is None or session_id in streams) and shown.get(session_id) != now:
                    shown[session_id] = now
                    step, fraction, message = now
                    yield ("event: progress\ndata: " + json.dumps({"session_id": session_id, "current_step": step,
                                                                   "progress": fraction, "message": message}) + "\n\n")
    finally:
        hub.unsubscribe(queue)
