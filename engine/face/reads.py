"""What a door reads: the reports of the read API (engine.queries), each carrying what a door
shows, so that no door computes it again: a session's allowed actions and each of its images
(number, name, seed, parameters, links); a batch's allowed actions, its items' images and its
contact sheet; lists with one kind of cursor; one capabilities shape.

Links are paths of the native HTTP API (`/v1/...`): every door gives the same ones, and a client
of another door can use them against `engine serve`.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from engine import commands, queries
from engine.errors import NotFound, ValidationError
from engine.ingest.jobs import ACTIONS, SCHEDULERS
from engine.machines import SESSION_STATUSES
from engine.outbox.png import parameters_of
from engine.outbox.sheets import seed_of
from engine.outbox.thumbs import make_thumbnail


# one session -----------------------------------------------------------------------------------

def session(engine, name: str) -> dict[str, Any]:
    """One session (by id or job_id): `engine session ID --json`, GET /v1/sessions/{id}, the stdio
    worker's get_session_status and the page all answer this."""
    report = queries.session_report(engine.store, engine.outbox, str(name))
    session_id = report["session_id"]
    report["actions"] = commands.allowed_session_actions(report)
    report["image_details"] = [
        {"number": number, "name": Path(path).name, "seed": _seed(Path(path).name, report["params"]),
         "parameters": parameters_of(Path(path)), "url": f"/v1/sessions/{session_id}/images/{number}",
         "thumbnail_url": f"/v1/sessions/{session_id}/images/{number}/thumbnail"}
        for number, path in enumerate(report["images"])]
    report["links"] = links("session", session_id)
    return report


def _seed(name: str, params: dict[str, Any]) -> int | None:
    """An image's seed: its file name says it (`00001-43.png`), else the session's."""
    found = seed_of(name)
    return found if found is not None else params.get("seed")


def links(kind: str, target_id: str) -> dict[str, str]:
    plural = "sessions" if kind == "session" else "batches"
    return {"self": f"/v1/{plural}/{target_id}", "events": f"/v1/events?{kind}={target_id}"}


def image_file(engine, name: str, number: int, thumbnail: bool = False) -> Path:
    """A session's image `number` (its thumbnail, made now when missing), or NOT_FOUND."""
    report = queries.session_report(engine.store, engine.outbox, str(name))
    if not 0 <= number < len(report["images"]):
        raise NotFound(f"session {report['session_id']} has {len(report['images'])} image(s); no image {number}")
    path = Path(report["images"][number])
    return make_thumbnail(path) if thumbnail else path


def job_file(engine, name: str, image: int | None = None) -> dict[str, Any]:
    """The job file that makes this session again; with `image`, that one picture (its seed): the
    workflow and every param that is set and not its default."""
    from engine.ingest.jobs import GenerationParams

    report = session(engine, name)
    params = dict(report["params"])
    if image is not None:
        if not 0 <= image < len(report["image_details"]):
            raise NotFound(f"session {report['session_id']} has no image {image}")
        params.update(num_images=1, seed=report["image_details"][image]["seed"])
    defaults = GenerationParams().model_dump()
    kept = {key: value for key, value in params.items()
            if value is not None and value != [] and defaults.get(key, object()) != value}
    job: dict[str, Any] = {"workflow": report["workflow_id"], "params": kept}
    if report["priority"]:
        job["priority"] = report["priority"]
    return job


# one batch -------------------------------------------------------------------------------------

def batch(engine, name: str) -> dict[str, Any]:
    """One batch (by id or job_id) with its items and metrics, its allowed actions, whether each
    completed item has an image, and its contact sheet's link once the batch has one."""
    report = queries.batch_report(engine.store, str(name))
    batch_id = report["batch_id"]
    report["actions"] = commands.allowed_batch_actions(report, [item["status"] for item in report["items"]])
    for item in report["items"]:
        item["has_image"] = item["status"] == "completed" and bool(engine.outbox.item_images(batch_id,
                                                                                             item["item_index"]))
    sheet = engine.outbox.contact_sheet(batch_id)
    report["contact_sheet"] = ({"path": str(sheet), "url": f"/v1/batches/{batch_id}/contact-sheet",
                                "version": int(sheet.stat().st_mtime)} if sheet.is_file() else None)
    report["links"] = links("batch", batch_id)
    return report


def contact_sheet_file(engine, name: str) -> Path:
    batch_id = queries.batch_report(engine.store, str(name))["batch_id"]
    sheet = engine.outbox.contact_sheet(batch_id)
    if not sheet.is_file():
        raise NotFound(f"batch {batch_id} has no contact sheet yet (it is made when the batch ends)")
    return sheet


# lists and their cursors -----------------------------------------------------------------------

SESSION_COLUMNS = tuple(c.strip() for c in queries.SESSION_LIST.split(","))  # of each row of a list of sessions

def encode_cursor(values: list) -> str:
    """The opaque cursor of a page's next page (a client hands it back as it is)."""
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode()


def decode_cursor(token: str | None, kinds: tuple[type, ...]) -> tuple | None:
    """The values of a cursor encode_cursor made, each of its kind; VALIDATION_ERROR otherwise."""
    if not token:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError
        return tuple(kind(value) for kind, value in zip(kinds, values))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("cursor: not one this server gave (take next_cursor as it is)",
                              [{"loc": "cursor"}]) from None


def sessions(engine, status: str | None = None, limit: int = 100, offset: int = 0, batch_id: str | None = None,
             job_id: str | None = None, workflow: str | None = None, cursor: str | None = None) -> dict[str, Any]:
    """Sessions, newest first, a page at a time: `sessions` and the `next_cursor` of the page
    after (None after the last)."""
    rows = queries.list_sessions(engine.store, status=status, limit=limit + 1, offset=offset, batch_id=batch_id,
                                 job_id=job_id, workflow=workflow, after=decode_cursor(cursor, (str, str)))
    more, rows = len(rows) > limit, rows[:limit]
    return {"sessions": rows,
            "next_cursor": encode_cursor([rows[-1]["created_at"], rows[-1]["session_id"]]) if more and rows else None}


def batches(engine, limit: int = 100, offset: int = 0, status: str | None = None) -> list[dict[str, Any]]:
    return queries.list_batches(engine.store, limit=limit, offset=offset, status=status)


def gallery(engine, limit: int = 48, cursor: str | None = None, job_id: str | None = None,
            contains: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Published images, newest first (queries.gallery), with the `next_cursor` of the page after."""
    found = queries.gallery(engine.store, engine.outbox, limit, decode_cursor(cursor, (str, str, int)),
                            job_id=job_id, contains=contains, model=model)
    return {"images": found["images"], "next_cursor": encode_cursor(found["next"]) if found["next"] else None}


def queue(engine) -> dict[str, Any]:
    """The queue as one read, in the order the claim takes it (with [runner] fair_share, owners' turns)."""
    fair = engine.config.get("runner", "fair_share")
    return queries.queue(engine.store, owners=dict(engine.config.values.get("owners") or {}) if fair else None)


def runners(engine) -> list[dict[str, Any]]:
    return queries.runners(engine.store)


def active_sessions(engine, limit: int = 15) -> list[dict[str, Any]]:
    return queries.active_sessions(engine.store, limit)


def counts(engine) -> dict[str, int]:
    return queries.counts(engine.store)


def deliveries(engine, status: str | None = None, limit: int = 100, target_name: str | None = None) -> list[dict]:
    return queries.deliveries(engine.store, status, limit, target_name)


def timeline(engine, name: str) -> list[dict[str, Any]]:
    """A session's step attempts (queries.attempts) and, per pipeline call, the sessions it served."""
    return queries.session_timeline(engine.store, str(name))


def call_members(engine, call_id: str) -> list[dict[str, Any]]:
    return queries.call_members(engine.store, call_id)


def target(engine, name: str) -> tuple[str, str]:
    """(session | batch, id) of a session id, batch id or accepted job_id; NOT_FOUND otherwise."""
    return queries.target(engine.store, str(name))


def events(engine, name: str, after: int = 0) -> dict[str, Any]:
    """The events of a session or batch (by id or job_id) after an event id, oldest first."""
    return queries.target_events(engine.store, str(name), after=after)


def stream_ids(engine, session: str | None = None, batch: str | None = None, job: str | None = None) -> set[str] | None:
    """The stream ids a follower of these asks for: a session, a batch and its items' sessions, what
    a job_id made (None: every stream)."""
    wanted: set[str] = set()
    if session:
        wanted.add(target_of_kind(engine, session, "session"))
    if batch:
        report = queries.batch_report(engine.store, target_of_kind(engine, batch, "batch"))
        wanted.update([report["batch_id"], *(item["session_id"] for item in report["items"])])
    if job:
        wanted.add(queries.target(engine.store, job)[1])
    return wanted or None


def target_of_kind(engine, name: str, kind: str) -> str:
    """The id of the session or batch (`kind`) this id or job_id names; NOT_FOUND if it names the other."""
    found_type, found_id = queries.target(engine.store, str(name))
    if found_type != kind:
        raise NotFound(f"no {kind} {name!r}")
    return found_id


# the catalogue ---------------------------------------------------------------------------------

def workflows(engine) -> list[dict[str, Any]]:
    return [{"id": w.id, "description": w.description, "steps": len(w.steps)} for w in engine.intake.workflows.values()]


def workflow(engine, workflow_id: str, params: Any = None) -> dict[str, Any]:
    """A workflow's resolved steps and the estimate of memory and time for these params."""
    from engine.domains.estimate import estimate
    from engine.ingest.jobs import validate_params

    found = engine.intake.workflow(workflow_id)
    checked = validate_params(params or {}, "parameters")
    return {"id": found.id, "description": found.description, "steps": found.resolve(checked.model_dump()),
            "estimate": estimate(engine.config, found, checked, models=engine.models)}


def models(engine) -> list[dict[str, Any]]:
    return [{"id": e.id, "kind": e.kind, "family": e.family, "format": e.format,
             **({"variant": e.variant} if e.variant else {})}
            for e in engine.models.entries().values()]


def families() -> list[dict[str, Any]]:
    """Every model family the engine runs, and what each supports (engine.domains.families)."""
    from engine.domains.families import known

    return [family.describe() for family in known().values()]


def family_of_model(engine, model_id: str | None) -> dict[str, Any]:
    """What a pipeline's family takes (the default pipeline's for None), with the model's own
    defaults (a variant's: FLUX.1 schnell's 4 steps and no guidance)."""
    from engine.domains.families import family_of, unused_params

    entry = engine.models.get(model_id, "pipeline") if model_id else engine.models.default_pipeline()
    family = family_of(entry.family)
    steps, guidance, fixed = family.defaults(entry.variant)
    return {**family.describe(), "model": entry.id, "variant": entry.variant, "steps": steps,
            "guidance_scale": guidance, "guidance_fixed": fixed, "unused_params": unused_params(family, entry.variant),
            "native_size": entry.default_size or family.native_size}


def capabilities(engine) -> dict[str, Any]:
    """What this engine takes, the same through every door: workflows, schedulers, models, the
    devices of its live runners, limits, actions, statuses."""
    devices = sorted({device for row in queries.runners(engine.store) if row["status"] == "running"
                      for device in json.loads(row["devices"] or "[]")})
    return {"workflows": sorted(engine.intake.workflows), "schedulers": list(SCHEDULERS), "models": models(engine),
            "devices": devices, "limits": dict(engine.config.values["limits"]), "families": families(),
            "actions": list(ACTIONS), "session_statuses": list(SESSION_STATUSES)}
