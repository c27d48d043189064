"""The ASGI app of `engine serve`: its routes, and the rules every request meets first (a token
when tokens are set, a body limit), and errors said as the contract says them, with a fitting
HTTP status. FastAPI, for its request models over pydantic (the engine's own) and the
OpenAPI document it writes at /openapi.json."""

from __future__ import annotations

import json
import logging
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import __version__
from engine.doors.http import a1111, native, openai_images
from engine.doors.http.shared import REQUEST_OWNER, HttpError, Stopping, Writes, status_of, token_owners
from engine.doors.web import auth, pages
from engine.doors.web.auth import token_of
from engine.errors import EngineError
from engine.face import operate, reads

def _error(code: str, message: str, details=None, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if code == "UNAUTHORIZED":
        headers["WWW-Authenticate"] = 'Bearer realm="engine"'
    return JSONResponse({"code": code, "message": message, "details": details or []}, status_code=status_of(code),
                        headers=headers)


class Guard:
    """Every request but /healthz, the login form and its styles needs a token when tokens are set
    (in the Authorization header, or the cookie the login form set); a page asked for without one
    leads to the login form. No request that changes anything may come from another site's page.
    No body may be larger than [server] max_body_bytes (a declared length is refused at once, a
    streamed one when it passes)."""

    def __init__(self, app: ASGIApp, tokens: dict[str, str | None], max_body: int, trusted_origins: list[str]) -> None:
        self.app, self.tokens, self.max_body, self.trusted = app, tokens, max_body, trusted_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        header_token = token_of(headers.get("authorization"), self.tokens)
        cookie_token = None if header_token or not self.tokens else token_of(
            f"Bearer {auth.cookie_token(headers.get('cookie')) or ''}", self.tokens)
        by_header, by_cookie = header_token is not None, cookie_token is not None
        REQUEST_OWNER.set(self.tokens.get(header_token or cookie_token) if self.tokens else None)
        if self.tokens and not (by_header or by_cookie) and not auth.is_open(path) and method != "OPTIONS":
            if auth.is_page(path) and method in ("GET", "HEAD"):
                target = path + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
                return await RedirectResponse(f"/login?{urlencode({'next': target})}", 303)(scope, receive, send)
            return await _error("UNAUTHORIZED", "a token is needed: Authorization: Bearer <token>")(scope, receive, send)
        refused = auth.cross_site(method, headers.get("host"), headers.get("origin"), headers.get("referer"),
                                  self.trusted, by_cookie)
        if refused:
            return await _error("FORBIDDEN", refused)(scope, receive, send)
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            return await _error("TOO_LARGE", f"the body is {declared} bytes, over [server] max_body_bytes "
                                f"({self.max_body})")(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HttpError("TOO_LARGE", f"the body is over [server] max_body_bytes ({self.max_body})")
            return message

        await self.app(scope, counted, send)


def create_app(engine, stopping: Stopping | None = None, runner_live=lambda: True) -> FastAPI:
    """The app over one Engine. `runner_live`: whether a runner is at work (for /readyz)."""
    stopping = stopping or Stopping()
    app = FastAPI(title="engine", version=__version__, description="A crash-proof job orchestrator for image "
                  "generation: the native API under /v1, OpenAI's images API and AUTOMATIC1111's /sdapi/v1.")

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        # The store's trouble (DATABASE_UNAVAILABLE, DATABASE_ERROR) is said with its own code, as
        # the CLI says it, and is worth a retry.
        return _error(exc.code, exc.message, exc.details, getattr(exc, "retry_after", None)
                      or (2 if exc.code.startswith("DATABASE_") else None))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error("BAD_REQUEST", "the body is not valid JSON", [{"loc": "body"}])
        if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
            return _error("BAD_REQUEST", "the body is not a JSON object (send Content-Type: application/json)",
                          [{"loc": "body"}])
        details = [{"loc": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
                    "message": e.get("msg", "")} for e in errors]
        first = details[0] if details else {"loc": "body", "message": "invalid"}
        return _error("VALIDATION_ERROR", f"{first['loc']}: {first['message']}", details)

    @app.exception_handler(Exception)
    async def unforeseen(request: Request, exc: Exception):  # a bug: said in the contract's shape, and logged
        logging.getLogger("engine.serve").exception("%s %s failed", request.method, request.url.path)
        return _error("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}")

    @app.exception_handler(json.JSONDecodeError)
    async def not_json(request: Request, exc: json.JSONDecodeError):
        return _error("BAD_REQUEST", f"the body is not valid JSON: {exc.msg}")

    @app.get("/healthz", summary="The process is up")
    def healthz():
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", summary="The store answers and a runner is live")
    def readyz():
        live = [r for r in reads.runners(engine) if r["status"] == "running"]  # the store answers, or 503
        if stopping.event.is_set() or not (live and runner_live()):
            why = "stopping" if stopping.event.is_set() else "no runner is live"
            return _error("STOPPING", f"not ready: {why}", retry_after=5)
        return {"status": "ready", "runners": len(live)}

    exposition = operate.metrics_exposition(engine)

    @app.get("/metrics", summary="Prometheus metrics: the queue from the store, this process's counters")
    def get_metrics():
        from fastapi.responses import Response

        body, kind = exposition()
        return Response(body, media_type=kind)

    writes = Writes()
    app.include_router(native.router(engine, stopping, writes))
    app.include_router(openai_images.router(engine, stopping, writes))
    app.include_router(a1111.router(engine, stopping, writes))
    pages.mount(app, engine)
    origins = list(engine.config.get("server", "cors_origins") or [])
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(Guard, tokens=token_owners(engine.config.get("server", "tokens")),
                       max_body=int(engine.config.get("server", "max_body_bytes")), trusted_origins=origins)
    return app
