"""Who may use the pages, and from where: the token of the API kept in an HttpOnly, SameSite=Strict
cookie after the login form, and no request that changes anything from another site.

Pure functions over header values; `engine.doors.http.app.Guard` applies them to every request."""

from __future__ import annotations

import base64
import binascii
import hmac
from urllib.parse import quote, unquote, urlsplit

COOKIE = "engine_token"
COOKIE_SECONDS = 30 * 24 * 3600
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Paths anyone may fetch: the probe, the login form and what it needs to look right.
OPEN_PATHS = ("/healthz", "/login", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
# Paths that are pages (a browser asked): without a token they lead to the login form, not a 401.
API_PREFIXES = ("/v1/", "/sdapi/", "/openapi.json", "/docs", "/redoc", "/readyz", "/ui/", "/metrics")


def token_of(header: str | None, tokens) -> str | None:
    """The token an Authorization header carries, if it is one of `tokens`."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value.strip(), validate=True).decode("utf-8", "replace").partition(":")[2]
        except (binascii.Error, ValueError):
            return None
    elif scheme.lower() != "bearer":
        return None
    given = value.strip().encode()
    found = None
    for token in tokens:  # every one compared, in constant time each
        if hmac.compare_digest(given, token.encode()):
            found = token
    return found


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def is_page(path: str) -> bool:
    return not (path.startswith(API_PREFIXES) or is_open(path))


def cookie_token(cookie_header: str | None) -> str | None:
    """The token the login form left in the Cookie header, if any."""
    for part in (cookie_header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return unquote(value)
    return None


def origin_of(url: str | None) -> str | None:
    """scheme://host[:port] of an Origin or Referer value (None for none, or for "null")."""
    if not url or url == "null":
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else None


def cross_site(method: str, host: str | None, origin: str | None, referer: str | None, trusted: list[str],
               by_cookie: bool) -> str | None:
    """Why a request that would change something must be refused as cross-site, or None.

    A browser names the page that sent a request in Origin (and Referer): a change asked for by a
    page of another site is refused, unless that site is one of [server] cors_origins. A request
    that rides on the login cookie must name its page; one with a token in its Authorization
    header (a program, not a browser's page) need not."""
    if method.upper() in SAFE_METHODS:
        return None
    sender = origin_of(origin) or origin_of(referer)
    if sender is None:
        return "a request carrying the login cookie must say where it comes from (Origin)" if by_cookie else None
    own = (host or "").lower()
    if urlsplit(sender).netloc == own or sender in {o.rstrip("/").lower() for o in trusted}:
        return None
    return f"a request from {sender} to change something here is refused (not this site, not in [server] cors_origins)"


def safe_next(target: str | None) -> str:
    """Where the login form sends a browser back to: a path on this site only."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def set_cookie_header(token: str, secure: bool) -> str:
    flags = f"; Max-Age={COOKIE_SECONDS}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    return f"{COOKIE}={quote(token, safe='')}{flags}"


def clear_cookie_header() -> str:
    return f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"
