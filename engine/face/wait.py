"""Waiting for a session to end, from the event log: what the OpenAI and AUTOMATIC1111 doors
answer once a generation is done. No thread is held while waiting."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from engine.errors import NotFound, Timeout
from engine.face import reads
from engine.store.follow import Follower

ENDING_EVENTS = ("session.completed", "session.failed", "session.cancelled", "session.deleted")
LOOK_EVERY = 0.1  # seconds between looks at the log


async def until_ended(engine, session_id: str, seconds: float, check: Callable[[], None] = lambda: None,
                      hint: str = "") -> dict[str, Any]:
    """The session's report (engine.face.reads.session) once it has ended and its result.json is
    written (its images are in place: they are published before it); TIMEOUT after `seconds`.
    `check` is called at each look and may raise (a server that is stopping)."""
    from starlette.concurrency import run_in_threadpool

    deadline = time.monotonic() + seconds
    # The follower first, then the status: an end committed between the two is in the log after it.
    follower = await run_in_threadpool(Follower, engine.store, None, ENDING_EVENTS, {session_id})
    report = await run_in_threadpool(_report, engine, session_id)
    ended = report is None or report["status"] in ("completed", "failed", "cancelled")
    while True:
        if not ended:
            ended = bool(await run_in_threadpool(follower.new))
        if ended:
            report = await run_in_threadpool(_report, engine, session_id)
            if report is None:
                raise NotFound(f"session {session_id} was deleted before it ended")
            if (engine.outbox.dir_of(report) / "result.json").exists():
                # Read after its result.json is in place, so the report's images are those in it.
                return await run_in_threadpool(reads.session, engine, session_id)
        check()
        if time.monotonic() > deadline:
            raise Timeout(f"session {session_id} has not ended after {seconds:g} s; it goes on{hint}")
        await asyncio.sleep(LOOK_EVERY)


def _report(engine, session_id: str) -> dict[str, Any] | None:
    from engine import queries

    try:
        return queries.session_report(engine.store, engine.outbox, session_id)
    except NotFound:
        return None
