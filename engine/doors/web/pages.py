"""The pages and their fragments. A page (`/`, `/sessions/{id}`, ...) is a whole document; its
fragment under `/ui/` is the part that changes, which the script fetches again when an event
says it changed. Every figure comes from the read API (`engine.queries`); every action the pages
offer is a call to the HTTP API under /v1, made by static/engine.js."""

from __future__ import annotations

import base64
import binascii
import json
from functools import wraps
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import Image

from engine import __version__, queries
from engine.doors.web import auth, forms, views
from engine.doors.web.auth import token_of
from engine.errors import EngineError, NotFound
from engine.ingest.jobs import job_schema
from engine.machines import BATCH, SESSION
from engine.outbox.sheets import seed_of
from engine.store.reducer import event_types

HERE = Path(__file__).parent
# Pages are for this site only: no inline script or style, nothing from elsewhere, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
SESSION_ACTIONS = ("pause", "resume", "cancel", "restart")
GALLERY_PAGE = 48


def mount(app: FastAPI, engine) -> None:
    """Add the pages, their fragments and the static files to the app."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(ago=views.ago, seconds=views.seconds, size=views.size, percent=views.percent)
    templates.env.globals.update(version=__version__, between=views.between, event_types=event_types())
    tokens = list(engine.config.get("server", "tokens") or [])
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    router = APIRouter(include_in_schema=False)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        response = templates.TemplateResponse(request, name, {"tokens_on": bool(tokens), **context},
                                              status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(template: str, title: str, nav: str):
        """A page: its context from `build`, or the error said as a page with its status."""
        def wrap(build):
            @wraps(build)
            def handler(request: Request, *args, **kwargs):
                try:
                    context = build(request, *args, **kwargs)
                except EngineError as exc:
                    from engine.doors.http.shared import status_of

                    return render(request, "error.html", status_of(getattr(exc, "code", "")) or 500,
                                  title="error", nav=nav, code=getattr(exc, "code", "ERROR"), message=str(exc))
                return render(request, template, title=context.pop("title", title), nav=nav, **context)
            return handler
        return wrap

    # signing in ----------------------------------------------------------------------------

    @router.get("/login")
    def login_form(request: Request, next: str = "/"):
        if not tokens:
            return RedirectResponse(auth.safe_next(next), 303)
        return render(request, "login.html", title="log in", nav="", next=auth.safe_next(next), failed=False)

    @router.post("/login")
    def login(request: Request, token: str = Form(""), next: str = Form("/")):
        if not tokens or token_of(f"Bearer {token.strip()}", tokens) is None:
            return render(request, "login.html", 401, title="log in", nav="", next=auth.safe_next(next),
                          failed=bool(tokens))
        response = RedirectResponse(auth.safe_next(next), 303)
        response.headers["Set-Cookie"] = auth.set_cookie_header(token.strip(), request.url.scheme == "https")
        return response

    @router.post("/logout")
    def logout():
        response = RedirectResponse("/login" if tokens else "/", 303)
        response.headers["Set-Cookie"] = auth.clear_cookie_header()
        return response

    # the queue -----------------------------------------------------------------------------

    def queue_context(request: Request) -> dict[str, Any]:
        fair = engine.config.get("runner", "fair_share")
        return {"queue": queries.queue(engine.store, owners=dict(engine.config.values.get("owners") or {})
                                       if fair else None)}

    router.get("/")(page("queue.html", "queue", "queue")(queue_context))
    router.get("/ui/queue")(page("parts/queue.html", "queue", "queue")(queue_context))

    # a session -----------------------------------------------------------------------------

    def session_context(request: Request, session_id: str) -> dict[str, Any]:
        report = queries.session_report(engine.store, engine.outbox, session_id)
        timeline = queries.session_timeline(engine.store, report["session_id"])
        calls = {}
        for entry in timeline:
            if entry["call_id"] and entry["call_id"] not in calls:
                calls[entry["call_id"]] = queries.call_members(engine.store, entry["call_id"])
        in_batch = bool(report["batch_id"])
        actions = [a for a in SESSION_ACTIONS if SESSION.allowed(a, report["status"])
                   and not (in_batch and a == "restart")]
        return {"title": report["job_id"] or report["session_id"], "report": report, "timeline": timeline,
                "calls": calls, "actions": actions, "can_delete": not in_batch and report["status"] != "running",
                "images": [{"number": n, "name": Path(p).name, "parameters": _parameters(Path(p))}
                           for n, p in enumerate(report["images"])],
                "job": views.job_json(report["workflow_id"], report["params"], report["priority"])}

    router.get("/sessions/{session_id}")(page("session.html", "session", "queue")(session_context))
    router.get("/ui/sessions/{session_id}")(page("parts/session.html", "session", "queue")(session_context))

    @router.get("/ui/sessions/{session_id}/job")
    def session_job(session_id: str, image: int | None = None):
        """The job file that makes the session again; with `image`, that one picture (its seed)."""
        report = queries.session_report(engine.store, engine.outbox, session_id)
        params = dict(report["params"])
        if image is not None:
            if not 0 <= image < len(report["images"]):
                raise NotFound(f"session {report['session_id']} has no image {image}")
            seed = seed_of(Path(report["images"][image]).name)
            params.update(num_images=1, seed=seed if seed is not None else params.get("seed"))
        return JSONResponse(views.job_file(report["workflow_id"], params, report["priority"]))

    # a batch -------------------------------------------------------------------------------

    def batch_context(request: Request, batch_id: str) -> dict[str, Any]:
        report = queries.batch_report(engine.store, batch_id)
        folder = engine.outbox.batch_dir(report["batch_id"])
        sheet = folder / "contact-sheet.png"
        for item in report["items"]:
            item["image"] = item["status"] == "completed" and _has_image(folder / f"item-{item['item_index']:05d}")
        actions = [a for a in SESSION_ACTIONS if BATCH.allowed(a, report["status"])]
        return {"title": report["name"] or report["job_id"] or report["batch_id"], "report": report,
                "actions": actions, "priority": report["priority"], "sheet": int(sheet.stat().st_mtime) if sheet.is_file() else None}

    router.get("/batches/{batch_id}")(page("batch.html", "batch", "queue")(batch_context))
    router.get("/ui/batches/{batch_id}")(page("parts/batch.html", "batch", "queue")(batch_context))

    # the gallery ---------------------------------------------------------------------------

    def gallery_context(request: Request, job: str = "", q: str = "", model: str = "", cursor: str = "") -> dict:
        found = queries.gallery(engine.store, engine.outbox, GALLERY_PAGE, _cursor(cursor), job_id=job or None,
                                contains=q or None, model=model or None)
        filters = {k: v for k, v in (("job", job), ("q", q), ("model", model)) if v}
        following = None
        if found["next"]:
            token = base64.urlsafe_b64encode(json.dumps(found["next"]).encode()).decode()
            following = "/ui/gallery?" + urlencode({**filters, "cursor": token})
        return {"images": found["images"], "next": following, "filters": filters,
                "models": sorted(engine.models.entries())}

    router.get("/gallery")(page("gallery.html", "gallery", "gallery")(gallery_context))
    router.get("/ui/gallery")(page("parts/gallery.html", "gallery", "gallery")(gallery_context))

    # submitting ----------------------------------------------------------------------------

    def submit_context(request: Request) -> dict[str, Any]:
        schema = job_schema()
        models = sorted(engine.models.entries())
        return {"workflows": sorted(engine.intake.workflows.values(), key=lambda w: w.id),
                "groups": forms.param_groups(schema, models), "job_fields": forms.job_fields(schema)}

    router.get("/submit")(page("submit.html", "submit", "submit")(submit_context))

    # the runners ---------------------------------------------------------------------------

    def runners_context(request: Request) -> dict[str, Any]:
        rows = queries.runners(engine.store)
        for row in rows:
            row["devices"] = json.loads(row["devices"] or "[]")
            row["warm_models"] = json.loads(row["warm_models"] or "[]")
        return {"runners": rows}

    router.get("/runners")(page("runners.html", "runners", "runners")(runners_context))
    router.get("/ui/runners")(page("parts/runners.html", "runners", "runners")(runners_context))

    @router.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    app.include_router(router)


def _parameters(png: Path) -> str:
    """The A1111 parameters text a PNG carries ("" when it carries none or cannot be read)."""
    try:
        with Image.open(png) as image:
            return str(image.info.get("parameters") or image.text.get("parameters") or "")
    except (OSError, ValueError):
        return ""


def _has_image(folder: Path) -> bool:
    runs = [folder, *sorted(folder.glob("run-*"), key=lambda f: int(f.name[4:]) if f.name[4:].isdigit() else 0)]
    for run in reversed(runs):
        try:
            return bool(json.loads((run / "result.json").read_text()).get("images"))
        except (OSError, ValueError):
            continue
    return False


def _cursor(cursor: str) -> tuple[str, str, int] | None:
    if not cursor:
        return None
    try:
        finished_at, session_id, number = json.loads(base64.urlsafe_b64decode(cursor.encode()).decode())
        return str(finished_at), str(session_id), int(number)
    except (ValueError, TypeError, binascii.Error):
        from engine.errors import ValidationError

        raise ValidationError("cursor: not one this page gave", [{"loc": "cursor"}]) from None
