"""Small helpers the tests share: submitting jobs, running until idle, the CLI in its own
process, reading the log."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from collections import Counter

from sqlalchemy import select, text

from engine import commands
from engine.ingest.jobs import parse_job
from engine.run.runner import Runner
from engine.store.tables import events


def submit(install, job: dict, name: str | None = None) -> commands.Submitted:
    name = name or f"{job.get('job_id') or uuid.uuid4().hex}.json"
    content_hash = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    return commands.submit(install.store, install.intake, parse_job(job, install.intake.limits),
                           commands.Source(name, content_hash))


def engine_process(install, *args: str, env: dict[str, str] | None = None) -> str:
    """`python -m engine ARGS` as its own process in the installation's folder; must exit 0."""
    done = subprocess.run([sys.executable, "-m", "engine", *args], env={**install.env(), **(env or {})},
                          capture_output=True, text=True, timeout=300, cwd=install.folder)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def runner(install, **kwargs) -> Runner:
    return install.engine.runner(**kwargs)


def run_until_idle(install, **kwargs) -> int:
    worker = runner(install, **kwargs)
    try:
        return worker.run(until_idle=True)
    finally:
        worker.close()


def query(install, sql: str, **params) -> list:
    with install.store.read() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def status(install, session_id: str) -> str:
    return query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session_id)[0][0]


def completions(install) -> Counter:
    """(session, run, step) -> how many step.completed events the log holds."""
    counts: Counter = Counter()
    with install.store.read() as conn:
        for row in conn.execute(select(events.c.data).where(events.c.type == "step.completed")):
            data = json.loads(row.data)
            counts[(data["session_id"], data["run"], data["step_index"])] += 1
    return counts


def event_types(install, stream_id: str) -> list[str]:
    return [e.type for e in install.store.stream("session", stream_id)]


def claim_one(store, runner_id: str, policy):
    """The next runnable step, claimed alone (as a runner's worker claims it when nothing joins it)."""
    from engine.run import claims

    found = claims.claim_group(store, runner_id, policy, {"coalesce": False})
    return found[0] if found else None
