"""What the HTTP routes share: the status a contract code is answered with, the writes' threads,
the token's owner, and the face's submit, control and wait as a request makes them."""

from __future__ import annotations

import base64
import contextvars
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.errors import EngineError, ValidationError
from engine.face import wait
from engine.face import writes as writes_face

KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,255}$")

# The HTTP status of each contract code (anything else: 500).
STATUS = {
    "VALIDATION_ERROR": 422, "UNKNOWN_WORKFLOW": 422, "UNKNOWN_MODEL": 422, "UNSAFE_PATH": 422,
    "UNSAFE_MODEL_FORMAT": 422, "DUPLICATE_JOB": 409, "NOT_FOUND": 404, "INVALID_TRANSITION": 409,
    "DATABASE_UNAVAILABLE": 503, "DATABASE_ERROR": 503, "DEVICE_UNAVAILABLE": 503, "TOO_LARGE": 413, "BAD_REQUEST": 400,
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

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()

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


def submit(engine, writes: Writes, job: Any, key: str | None, door: str) -> writes_face.Submitted:
    """The face's submit of a mapping, as this request's token's owner; returns once committed."""
    return writes(writes_face.submit_mapping, engine, job, door, key, REQUEST_OWNER.get())


def control(engine, writes: Writes, target: str, action: str, priority: int | None = None) -> dict[str, Any]:
    return writes(writes_face.control, engine, target, action, priority)


async def wait_for(engine, session_id: str, seconds: float, stopping: Stopping) -> dict[str, Any]:
    """The session's report once it has ended (TIMEOUT after `seconds`); waits on no thread."""
    return await wait.until_ended(engine, session_id, seconds, stopping.check,
                                  hint=f": GET /v1/sessions/{session_id}")


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
