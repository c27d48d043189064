"""The native API under /v1: jobs, sessions, batches, events (Server-Sent Events), the catalogue
and the runners. The same submit path and the same reports as the inbox, the CLI and the stdio
worker: a session here is `engine session ID --json`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from engine.doors.http.shared import control, idempotency_key, submit
from engine.errors import NotFound, ValidationError
from engine.face import reads, words
from engine.face import writes as writes_face
from engine.face.follow import Follower
from engine.store.errors import StoreError

CONTROLS = tuple(action for action in words.ACTIONS if action != "delete")


class NewPriority(BaseModel):
    priority: int = Field(ge=0, le=1000, description="0 to 1000; higher runs first")


def router(engine, stopping, writes) -> APIRouter:
    api = APIRouter(prefix="/v1")
    hub = EventHub(engine)

    @api.post("/jobs", status_code=201, summary="Submit a job file's JSON (a session, a batch or a control)")
    def post_job(job: dict[str, Any], idempotency: str | None = Header(None, alias="Idempotency-Key")):
        done = submit(engine, writes, job, idempotency_key(idempotency), "http")
        if done.target_type == "control":
            return JSONResponse({"target_id": done.target_id, "status": "accepted"}, status_code=200)
        report = reads.session(engine, done.target_id) if done.target_type == "session" else \
            reads.batch(engine, done.target_id)
        body = {f"{done.target_type}_id": done.target_id, "job_id": report["job_id"], "status": report["status"],
                "already_submitted": done.already, "links": report["links"]}
        return JSONResponse(body, status_code=200 if done.already else 201)

    # sessions ------------------------------------------------------------------------------

    @api.get("/sessions", summary="Sessions, newest first, a page at a time")
    def get_sessions(status: str | None = None, job_id: str | None = None, workflow: str | None = None,
                     batch: str | None = None, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
        return reads.sessions(engine, status=status, limit=limit, batch_id=batch, job_id=job_id, workflow=workflow,
                              cursor=cursor)

    @api.get("/sessions/{session_id}", summary="One session: the report `engine session ID --json` gives")
    def get_session(session_id: str):
        return reads.session(engine, session_id)

    @api.get("/sessions/{session_id}/images/{number}", summary="A session's image (a PNG with its parameters)")
    def get_image(session_id: str, number: int):
        return FileResponse(reads.image_file(engine, session_id, number), media_type="image/png")

    @api.get("/sessions/{session_id}/images/{number}/thumbnail",
             summary="A session's image as a small WebP (made when published, or now)")
    def get_thumbnail(session_id: str, number: int):
        return FileResponse(reads.image_file(engine, session_id, number, thumbnail=True), media_type="image/webp",
                            headers={"Cache-Control": "private, max-age=86400"})

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
        path = await run_in_threadpool(writes_face.save_upload, engine, data, "file")
        return {"path": path}

    @api.get("/schema", summary="The JSON Schema of a job file (`engine schema`)")
    def get_schema():
        return words.job_schema()

    # batches -------------------------------------------------------------------------------

    @api.get("/batches", summary="Batches, newest first")
    def get_batches(status: str | None = None, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
        return {"batches": reads.batches(engine, limit=limit, offset=offset, status=status)}

    @api.get("/batches/{batch_id}", summary="One batch with its items and metrics (`engine batch ID --json`)")
    def get_batch(batch_id: str):
        return reads.batch(engine, batch_id)

    @api.get("/batches/{batch_id}/contact-sheet", summary="The batch's contact sheet (PNG)")
    def get_contact_sheet(batch_id: str):
        return FileResponse(reads.contact_sheet_file(engine, batch_id), media_type="image/png")

    for kind in ("session", "batch"):
        _control_routes(api, engine, writes, kind)

    # events --------------------------------------------------------------------------------

    @api.get("/events", summary="The event log as Server-Sent Events (id: the event id; Last-Event-ID resumes)")
    async def get_events(request: Request, session: str | None = None, batch: str | None = None,
                         job: str | None = None, after: int | None = None,
                         last_event_id: str | None = Header(None, alias="Last-Event-ID")):
        streams = await run_in_threadpool(reads.stream_ids, engine, session, batch, job)
        return StreamingResponse(_event_stream(engine, hub, request, streams, _start(after, last_event_id), stopping),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # the catalogue -------------------------------------------------------------------------

    @api.get("/workflows", summary="The workflow templates")
    def get_workflows():
        return {"workflows": reads.workflows(engine)}

    @api.get("/models", summary="The registered models")
    def get_models():
        return {"models": reads.models(engine)}

    @api.get("/runners", summary="The runners registered with this database")
    def get_runners():
        return {"runners": reads.runners(engine)}

    @api.get("/capabilities", summary="What this engine takes: workflows, schedulers, models, devices, limits, "
             "actions, statuses")
    def get_capabilities():
        return reads.capabilities(engine)

    return api


def _control_routes(api: APIRouter, engine, writes, kind: str) -> None:
    """POST /v1/{sessions|batches}/{id}/{action} and DELETE /v1/{sessions|batches}/{id}."""
    plural = "sessions" if kind == "session" else "batches"

    @api.post(f"/{plural}/{{target}}/priority", summary=f"Give a {kind} a new priority (the next claim sees it)",
              name=f"priority_{kind}")
    def priority_one(target: str, body: NewPriority):
        return control(engine, writes, reads.target_of_kind(engine, target, kind), "priority", body.priority)

    @api.post(f"/{plural}/{{target}}/{{action}}", summary=f"pause, resume, cancel or restart a {kind}",
              name=f"control_{kind}")
    def control_one(target: str, action: str):
        return _control(engine, writes, reads.target_of_kind(engine, target, kind), action)

    @api.delete(f"/{plural}/{{target}}", summary=f"Remove a {kind} from the status tables (events are kept)",
                name=f"delete_{kind}")
    def delete_one(target: str):
        return _control(engine, writes, reads.target_of_kind(engine, target, kind), "delete")


def _control(engine, writes, target: str, action: str) -> dict[str, Any]:
    if action not in words.ACTIONS or action == "priority":
        raise NotFound(f"no action {action!r}; one of {', '.join(CONTROLS)} (POST), or DELETE")
    return control(engine, writes, target, action)


def _start(after: int | None, last_event_id: str | None) -> int | None:
    """Where a stream starts: after Last-Event-ID (a reconnect), else after `after`, else now."""
    if last_event_id is not None:
        try:
            return int(last_event_id)
        except ValueError:
            raise ValidationError("Last-Event-ID: an event id this stream sent", [{"loc": "Last-Event-ID"}]) from None
    return after


class EventHub:
    """One reader of the event log for every subscriber of this process: it polls the log (and the
    running steps' progress) while anyone listens and hands each new event to every subscriber's
    queue, so a hundred subscribers cost one query, not a hundred."""

    EVERY = 0.05  # seconds between looks at the log
    PROGRESS_EVERY = 10  # looks between looks at the running steps' progress

    def __init__(self, engine) -> None:
        self.engine = engine
        self.queues: set[asyncio.Queue] = set()
        self.follower: Follower | None = None
        self.task: asyncio.Task | None = None

    async def subscribe(self) -> tuple[asyncio.Queue, int]:
        """A queue of what comes after the returned event id."""
        if self.follower is None:
            self.follower = await run_in_threadpool(Follower, self.engine.store)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.add(queue)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        return queue, self.follower.last

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.queues.discard(queue)

    async def _run(self) -> None:
        tick = 0
        while self.queues:
            try:
                found = await run_in_threadpool(self.follower.new, 1000)
                progress = (await run_in_threadpool(_progress, self.engine)
                            if tick % self.PROGRESS_EVERY == 0 else None)
            except StoreError:  # the database's trouble: the next look tries again
                found, progress = [], None
            for event in found:
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
            for row in reads.active_sessions(engine, limit=1000) if row["status"] == "running"}


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
        backlog = Follower(engine.store, after=sent, streams=streams)
        while start is not None and backlog.last < live_from:  # the backlog, read from the log
            found = await run_in_threadpool(backlog.new, 1000)
            for event in found:
                if event["event_id"] <= live_from:
                    yield _frame(event)
            if len(found) < 1000:
                break
        sent = max(sent, live_from)
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
