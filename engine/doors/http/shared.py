"""What the HTTP routes share: the status a contract code is answered with, submitting a job
(idempotently), waiting for a session to end, and images sent in a request body."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import binascii
import hashlib
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine import commands, queries
from engine.errors import EngineError, NotFound, ValidationError
from engine.ingest.inputs import read_image
from engine.ingest.jobs import normalise_keys, parse_job

ENDED = ("completed", "failed", "cancelled")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,255}$")

# The HTTP status of each contract code (anything else: 500).
STATUS = {
    "VALIDATION_ERROR": 422, "UNKNOWN_WORKFLOW": 422, "UNKNOWN_MODEL": 422, "UNSAFE_PATH": 422,
    "UNSAFE_MODEL_FORMAT": 422, "DUPLICATE_JOB": 409, "NOT_FOUND": 404, "INVALID_TRANSITION": 409,
    "DATABASE_UNAVAILABLE": 503, "DEVICE_UNAVAILABLE": 503, "TOO_LARGE": 413, "BAD_REQUEST": 400,
    "UNAUTHORIZED": 401, "FORBIDDEN": 403, "QUOTA_EXCEEDED": 429, "TIMEOUT": 504, "STOPPING": 503, "RATE_LIMITED": 429,
}


def status_of(code: str) -> int:
    """The HTTP status a contract error code is answered with."""
    return STATUS.get(code, 500)


class HttpError(EngineError):
    """An error only the HTTP door has: a body too large, not JSON, no token, the server stopping."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class Stopping:
    """Set when the server begins to stop: waiting routes answer 503 with Retry-After."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def check(self) -> None:
        if self.event.is_set():
            raise HttpError("STOPPING", "the server is stopping; send the request again (with the same "
                            "Idempotency-Key it finds the same job)", retry_after=5)


class Writes:
    """The door's writes, made on a few threads of their own. The store keeps one writing
    connection per thread; request threads are many (a burst of fifty clients), so they hand their
    writes here and a burst holds a handful of connections, not one per request thread."""

    def __init__(self, threads: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="engine-http-writes")

    def __call__(self, fn, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# The owner of this request's token ([server.tokens] maps a token to an owner), set by the Guard.
REQUEST_OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar("engine_request_owner", default=None)


def token_owners(configured) -> dict[str, str | None]:
    """[server] tokens as {token: owner}: a list names tokens whose jobs say their own owner; a
    table ([server.tokens], token = "owner") gives each token the owner it submits as."""
    if isinstance(configured, dict):
        return {str(token): str(owner) for token, owner in configured.items()}
    return {str(token): None for token in configured or []}


def idempotency_key(header: str | None) -> str | None:
    """An Idempotency-Key header, checked: it becomes the job's job_id."""
    if header is None:
        return None
    if not KEY_PATTERN.match(header):
        raise ValidationError("Idempotency-Key: 1 to 256 letters, digits and ._:@/+=- (a UUID, say), starting with "
                              "a letter or digit", [{"loc": "Idempotency-Key"}])
    return header


def submit(engine, writes: Writes, job: dict[str, Any], key: str | None, door: str) -> commands.Submitted:
    """Validate and record a job; a repeat of a key (Idempotency-Key or job_id) is the same job.
    Returns once the job is committed."""
    if not isinstance(job, dict):
        raise ValidationError(f"the body is one JSON object, not {type(job).__name__}")
    job = normalise_keys(job)
    owner = REQUEST_OWNER.get()
    if owner is not None:
        if job.get("owner") not in (None, owner):
            raise HttpError("FORBIDDEN", f"owner: this token submits as {owner!r}, not {job['owner']!r}")
        job["owner"] = owner
    if key is not None:
        if job.get("job_id") not in (None, key):
            raise ValidationError("job_id and Idempotency-Key differ; give one", [{"loc": "job_id"}])
        job["job_id"] = key
    parsed = parse_job(job, engine.intake.limits)
    raw = repr(sorted(job.items())).encode()
    source = commands.Source(door, hashlib.sha256(raw).hexdigest(), f"{door}:{uuid.uuid4().hex}")
    return writes(commands.submit, engine.store, engine.intake, parsed, source, resent_is_same=True)


def control(engine, writes: Writes, target: str, action: str, priority: int | None = None) -> dict[str, Any]:
    target_type, target_id, appended = writes(commands.control, engine.store, target, action, priority)
    return {"target_type": target_type, "target_id": target_id, "action": action,
            **({"priority": priority} if action == "priority" else {}), "events": [e.type for e in appended]}


async def wait_for(engine, session_id: str, seconds: float, stopping: Stopping) -> dict[str, Any]:
    """The session's report once it has ended (TIMEOUT after `seconds`); waits on no thread."""
    from starlette.concurrency import run_in_threadpool

    from engine.run.claims import session_statuses

    deadline, folder = time.monotonic() + seconds, None
    while True:
        # One status read a look; the whole report only once the session has ended.
        (status,) = await run_in_threadpool(session_statuses, engine.store, [session_id])
        if status in ENDED or status is None:  # None: deleted meanwhile (the report says NOT_FOUND)
            if folder is None:  # where its result.json will be
                folder = Path((await run_in_threadpool(queries.session_report, engine.store, engine.outbox,
                                                       session_id))["outbox"])
            if (folder / "result.json").exists():
                # Read after its result.json is in place, so the report's images are those in it (a
                # report read just before the file was written has none).
                return await run_in_threadpool(queries.session_report, engine.store, engine.outbox, session_id)
        stopping.check()
        if time.monotonic() > deadline:
            raise HttpError("TIMEOUT", f"session {session_id} has not ended after {seconds:g} s; it goes on: "
                            f"GET /v1/sessions/{session_id}")
        await asyncio.sleep(0.1)


def ended_or_raise(report: dict[str, Any]) -> dict[str, Any]:
    """A completed session's report; its error, as the contract says it, when it did not complete."""
    if report["status"] == "completed":
        return report
    error = report.get("error") or {"code": "CANCELLED", "message": "cancelled"}
    failure = EngineError(f"session {report['session_id']} {report['status']}: {error['message']}")
    failure.code = error["code"]
    raise failure


def images_base64(report: dict[str, Any]) -> list[str]:
    out = []
    for path in report["images"]:
        with open(path, "rb") as handle:
            out.append(base64.b64encode(handle.read()).decode())
    return out


def save_upload(engine, data: bytes | str, field: str) -> str:
    """An image sent in a request (bytes, or base64 with or without a data: prefix), checked under
    limits.max_image_pixels and written into the inbox's images/ folder under a generated name;
    returns its path relative to the inbox (what a job names)."""
    if isinstance(data, str):
        if data.startswith("data:"):
            data = data.split(",", 1)[-1]
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(f"{field}: not base64", [{"loc": field}]) from None
    limit = engine.config.get("limits", "max_image_pixels")
    folder = engine.config.inbox / "images" / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{uuid.uuid4().hex}.png"
    staged = folder / f".{name}.part"
    staged.write_bytes(data)
    try:
        read_image(staged, field, limit)  # the pixel limit from the header, then a full decode
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    staged.rename(folder / name)
    return f"images/uploads/{name}"


def target_or_404(engine, name: str, kind: str) -> str:
    found_type, found_id = queries.target(engine.store, name)
    if found_type != kind:
        raise NotFound(f"no {kind} {name!r}")
    return found_id
