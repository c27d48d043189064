"""What a door writes: a job (a file's bytes, or a mapping from a request), a control, an uploaded
image, a webhook delivery due again. One submit path (engine.commands) under all of them, one
idempotency rule for a job given as a mapping, and one answer to a control.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from engine import commands
from engine.commands import Submitted
from engine.errors import Forbidden, ValidationError
from engine.inputs import read_image
from engine.ingest.jobs import normalise_keys, parse_job, parse_job_bytes

__all__ = ["Submitted", "check_file", "control", "retry_delivery", "save_upload", "submit_file", "submit_mapping"]


def submit_mapping(engine, job: Any, door: str, key: str | None = None, owner: str | None = None) -> Submitted:
    """A job sent as a mapping (an HTTP body, a stdio request), validated and recorded as a job
    file is. The idempotency rule of every door: its `job_id` (or `key`, an Idempotency-Key that
    becomes the job_id; the two may not differ) names one job, so the same job sent again is
    answered with what it made (`already`), not refused. `owner`: the owner a door's credentials
    submit as; a job naming another is FORBIDDEN."""
    if not isinstance(job, dict):
        raise ValidationError(f"the job is one JSON object, not {type(job).__name__}")
    job = normalise_keys({k: v for k, v in job.items() if v is not None})
    if owner is not None:
        if job.get("owner") not in (None, owner):
            raise Forbidden(f"owner: these credentials submit as {owner!r}, not {job['owner']!r}")
        job["owner"] = owner
    if key is not None:
        if job.get("job_id") not in (None, key):
            raise ValidationError("job_id and Idempotency-Key differ; give one", [{"loc": "job_id"}])
        job["job_id"] = key
    parsed = parse_job(job, engine.intake.limits)
    content = json.dumps(job, sort_keys=True, default=str).encode()
    source = commands.Source(door, hashlib.sha256(content).hexdigest(), f"{door}:{uuid.uuid4().hex}")
    return commands.submit(engine.store, engine.intake, parsed, source, resent_is_same=True)


def submit_file(engine, raw: bytes, name: str) -> Submitted:
    """A job file's bytes (`engine submit FILE`), as the inbox would take them; a job_id seen
    before is DUPLICATE_JOB, as for a second file in the inbox."""
    job = parse_job_bytes(raw, engine.intake.limits)
    return commands.submit(engine.store, engine.intake, job, commands.Source(name, hashlib.sha256(raw).hexdigest()))


def check_file(engine, raw: bytes) -> str:
    """Everything submit checks of a job file's bytes, writing nothing (`engine validate`): what
    the job would be (session, batch or control), or the error submit would raise."""
    return commands.check(engine.store, engine.intake, parse_job_bytes(raw, engine.intake.limits))


def control(engine, target: str, action: str, priority: int | None = None) -> dict[str, Any]:
    """pause | resume | cancel | restart | delete a session or batch (by id or job_id), or give it
    a new `priority` (action "priority"). Every door answers with this: the target, the action,
    the events it appended and when it took effect (the last event's time)."""
    target_type, target_id, appended = commands.control(engine.store, str(target), action, priority)
    return {"target_type": target_type, "target_id": target_id, "action": action,
            **({"priority": priority} if action == "priority" else {}), "events": [e.type for e in appended],
            "effective_at": appended[-1].created_at if appended else None}


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


def upload_path(engine, relative: str) -> Path:
    """Where an uploaded image (a path save_upload answered) is on disk."""
    return engine.config.inbox / relative


def retry_delivery(engine, delivery_id: str) -> list:
    """A dead (or pending) webhook delivery due again now (`engine notify retry ID`)."""
    from engine.notify.deliver import retry

    return retry(engine.store, delivery_id)
