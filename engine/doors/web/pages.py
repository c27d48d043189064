"""The pages and their fragments. A page (`/`, `/sessions/{id}`, ...) is a whole document; its
fragment under `/ui/` is the part that changes, which the script fetches again when an event
says it changed. Every figure, and every action a page offers, comes from the face's reports
(engine.face.reads); each action is a call to the HTTP API under /v1, made by static/engine.js."""

from __future__ import annotations

import json
from functools import wraps
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from engine import __version__
from engine.doors.web import auth, forms, views
from engine.doors.web.auth import token_of
from engine.errors import EngineError
from engine.face import reads, words

HERE = Path(__file__).parent
# Pages are for this site only: no inline script or style, nothing from elsewhere, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
BUTTONS = ("pause", "resume", "cancel", "restart")  # the allowed actions a page shows as buttons
GALLERY_PAGE = 48


def mount(app: FastAPI, engine) -> None:
    """Add the pages, their fragments and the static files to the app."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(ago=views.ago, seconds=views.seconds, size=views.size, percent=views.percent)
    templates.env.globals.update(version=__version__, between=views.between, event_types=words.event_types(),
                                 ended=words.TERMINAL, vocabulary=json.dumps(words.for_the_page()))
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
        return {"queue": reads.queue(engine)}

    router.get("/")(page("queue.html", "queue", "queue")(queue_context))
    router.get("/ui/queue")(page("parts/queue.html", "queue", "queue")(queue_context))

    # a session -----------------------------------------------------------------------------

    def session_context(request: Request, session_id: str) -> dict[str, Any]:
        report = reads.session(engine, session_id)
        timeline = reads.timeline(engine, report["session_id"])
        calls = {}
        for entry in timeline:
            if entry["call_id"] and entry["call_id"] not in calls:
                calls[entry["call_id"]] = reads.call_members(engine, entry["call_id"])
        return {"title": report["job_id"] or report["session_id"], "report": report, "timeline": timeline,
                "calls": calls, "actions": [a for a in BUTTONS if a in report["actions"]],
                "can_delete": "delete" in report["actions"], "can_reprioritize": "priority" in report["actions"],
                "images": report["image_details"],
                "job": json.dumps(reads.job_file(engine, report["session_id"]), indent=2)}

    router.get("/sessions/{session_id}")(page("session.html", "session", "queue")(session_context))
    router.get("/ui/sessions/{session_id}")(page("parts/session.html", "session", "queue")(session_context))

    @router.get("/ui/sessions/{session_id}/job")
    def session_job(session_id: str, image: int | None = None):
        """The job file that makes the session again; with `image`, that one picture (its seed)."""
        return JSONResponse(reads.job_file(engine, session_id, image))

    # a batch -------------------------------------------------------------------------------

    def batch_context(request: Request, batch_id: str) -> dict[str, Any]:
        report = reads.batch(engine, batch_id)
        return {"title": report["name"] or report["job_id"] or report["batch_id"], "report": report,
                "actions": [a for a in BUTTONS if a in report["actions"]],
                "can_reprioritize": "priority" in report["actions"], "priority": report["priority"],
                "sheet": report["contact_sheet"]}

    router.get("/batches/{batch_id}")(page("batch.html", "batch", "queue")(batch_context))
    router.get("/ui/batches/{batch_id}")(page("parts/batch.html", "batch", "queue")(batch_context))

    # the gallery ---------------------------------------------------------------------------

    def gallery_context(request: Request, job: str = "", q: str = "", model: str = "", cursor: str = "") -> dict:
        found = reads.gallery(engine, GALLERY_PAGE, cursor or None, job_id=job or None, contains=q or None,
                              model=model or None)
        filters = {k: v for k, v in (("job", job), ("q", q), ("model", model)) if v}
        following = "/ui/gallery?" + urlencode({**filters, "cursor": found["next_cursor"]}) if found["next_cursor"] \
            else None
        return {"images": found["images"], "next": following, "filters": filters,
                "models": sorted(engine.models.entries())}

    router.get("/gallery")(page("gallery.html", "gallery", "gallery")(gallery_context))
    router.get("/ui/gallery")(page("parts/gallery.html", "gallery", "gallery")(gallery_context))

    # submitting ----------------------------------------------------------------------------

    def submit_context(request: Request) -> dict[str, Any]:
        schema = words.job_schema()
        entries = engine.models.entries()
        models = sorted(entries)
        pipelines = sorted(m for m, e in entries.items() if e.kind == "pipeline")
        described = {m: forms.model_form(reads.family_of_model(engine, m)) for m in pipelines}
        default = engine.models.default_pipeline().id if pipelines else None
        return {"workflows": sorted(engine.intake.workflows.values(), key=lambda w: w.id),
                "groups": forms.param_groups(schema, models), "job_fields": forms.job_fields(schema),
                "model_forms": {"default": default, "models": described}}

    router.get("/submit")(page("submit.html", "submit", "submit")(submit_context))

    # the runners ---------------------------------------------------------------------------

    def runners_context(request: Request) -> dict[str, Any]:
        rows = reads.runners(engine)
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
