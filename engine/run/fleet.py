"""Runner processes, registered in the store: who runs where, and which of them are gone.

Each runner process writes one row (runner id, host, pid, the process's start time, version,
devices, warm models) and renews it with its heartbeat. A runner on the same host can tell at once
whether another one's process still exists (pid and start time, so a reused pid is not mistaken
for it); elsewhere a runner counts as gone when its heartbeat is older than its lease period.
`dead_on_this_host` is the pure rule; the rest reads and writes rows.

The runners table is the one table written outside the event log, on purpose: it is a register of
heartbeats, renewed by every runner every few seconds. As events, the beats would grow the log by
thousands of rows an hour that no replay needs (a runner's liveness is now, not history), and the
log's newest event id, which idle runners watch to wake for new work, would change at every beat
and wake them all. What matters of a runner's life is in the log already: the steps it claimed,
finished and handed back, and those taken back from it when it was gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import psutil
from sqlalchemy import delete, select, text, update

from engine.store import Store, now_iso
from engine.store.tables import leases, runners

HOST = socket.gethostname()


@dataclass(frozen=True)
class RunnerRow:
    runner_id: str
    host: str
    pid: int
    process_started: float | None
    status: str


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return 0.0  # exists, but cannot be looked at: assume it is alive


def dead_on_this_host(rows: Iterable[RunnerRow], host: str, started_of: Callable[[int], float | None],
                      me: str) -> list[str]:
    """Runner ids on `host` whose process no longer exists (or whose pid now belongs to a process
    that started later: the pid was reused)."""
    dead = []
    for row in rows:
        if row.host != host or row.runner_id == me or row.status != "running":
            continue
        started = started_of(row.pid)
        if started is None or (started and row.process_started and abs(started - row.process_started) > 1.0):
            dead.append(row.runner_id)
    return dead


def register(store: Store, runner_id: str, lease_seconds: float, version: str, devices: list[str]) -> None:
    pid = os.getpid()
    values = {"host": HOST, "pid": pid, "process_started": process_started(pid), "version": version,
              "devices": json.dumps(devices), "warm_models": "[]", "status": "running", "started_at": now_iso(),
              "last_heartbeat": now_iso(), "expires_at": time.time() + lease_seconds}

    def write(tx) -> None:
        tx.conn.execute(delete(runners).where(runners.c.runner_id == runner_id))
        tx.conn.execute(runners.insert().values(runner_id=runner_id, **values))

    store.write(write)


def beat(store: Store, runner_id: str, lease_seconds: float, warm_models: list[str] | None = None,
         memory: dict | None = None) -> None:
    values = {"last_heartbeat": now_iso(), "expires_at": time.time() + lease_seconds, "status": "running"}
    if warm_models is not None:
        values["warm_models"] = json.dumps(warm_models)
    if memory is not None:
        values["memory"] = json.dumps(memory)
    store.write(lambda tx: tx.conn.execute(update(runners).where(runners.c.runner_id == runner_id).values(**values)))


def stopped(store: Store, runner_id: str) -> None:
    store.write(lambda tx: tx.conn.execute(
        update(runners).where(runners.c.runner_id == runner_id).values(status="stopped", last_heartbeat=now_iso())))


def find_dead_here(store: Store, me: str) -> list[str]:
    """Runners of this host whose process is gone (they may still hold leases)."""
    with store.read() as conn:
        rows = [RunnerRow(r.runner_id, r.host, r.pid, r.process_started, r.status) for r in conn.execute(
            select(runners.c.runner_id, runners.c.host, runners.c.pid, runners.c.process_started, runners.c.status)
            .where(runners.c.host == HOST, runners.c.status == "running"))]
    return dead_on_this_host(rows, HOST, process_started, me)


def mark_gone(store: Store, runner_ids: list[str]) -> None:
    if runner_ids:
        store.write(lambda tx: tx.conn.execute(
            update(runners).where(runners.c.runner_id.in_(runner_ids)).values(status="gone")))


def worker_names(conn, live_only: bool = True, now: float | None = None) -> list[str]:
    """The workers (devices) registered runners offer: of live runners (running, heartbeat within
    the lease), or of every runner ever registered."""
    now = time.time() if now is None else now
    query = select(runners.c.devices, runners.c.host, runners.c.pid, runners.c.process_started,
                   runners.c.runner_id, runners.c.status)
    if live_only:
        query = query.where(runners.c.status == "running", runners.c.expires_at >= now)
    names = []
    for row in conn.execute(query):
        if live_only and dead_on_this_host([RunnerRow(row.runner_id, row.host, row.pid, row.process_started,
                                                      row.status)], HOST, process_started, me=""):
            continue
        names.extend(json.loads(row.devices or "[]"))
    return names


def listing(conn) -> list[dict]:
    """Every registered runner as runner_status shows it, except that a runner of this host whose
    process is gone shows as gone at once (as lease_holder_state, and so `engine session`, sees it),
    not only when its heartbeat lapses."""
    rows = [dict(r) for r in conn.execute(text(
        "SELECT s.runner_id, s.host, s.pid, s.status, s.devices, s.warm_models, s.last_heartbeat, s.version, "
        "r.process_started, r.memory FROM runner_status s JOIN runners r ON r.runner_id = s.runner_id "
        "ORDER BY s.status = 'running' DESC, s.last_heartbeat DESC")).mappings()]
    dead = set(dead_on_this_host([RunnerRow(r["runner_id"], r["host"], r["pid"], r["process_started"], r["status"])
                                  for r in rows], HOST, process_started, me=""))
    for row in rows:
        row.pop("process_started")
        row["memory"] = json.loads(row["memory"]) if row["memory"] else {}
        if row["runner_id"] in dead:
            row["status"] = "gone"
    return rows


def lease_holder_state(conn, session_id: str, step_index: int, now: float | None = None) -> str | None:
    """'running' when a live runner holds this step; 'waiting' when its lease expired or its
    runner is gone (it waits for a runner to take it back); None when no lease exists."""
    now = time.time() if now is None else now
    lease = conn.execute(select(leases.c.runner_id, leases.c.expires_at).where(
        leases.c.session_id == session_id, leases.c.step_index == step_index)).first()
    if lease is None:
        return None
    if lease.expires_at < now:
        return "waiting"
    row = conn.execute(select(runners.c.runner_id, runners.c.host, runners.c.pid, runners.c.process_started,
                              runners.c.status).where(runners.c.runner_id == lease.runner_id)).first()
    if row is None:
        return "running"  # a runner of an older version, not registered: trust its lease
    if row.status != "running":
        return "waiting"
    dead = dead_on_this_host([RunnerRow(*row)], HOST, process_started, me="")
    return "waiting" if dead else "running"


def why_waiting(conn, session_id: str, status: str, current_step: int, params: dict) -> str | None:
    """Why a pending or running session makes no progress, when it is stuck rather than queued: the
    runner holding its step is gone (the step waits for a live runner to take it back), no runner
    is running, or none offers the device the session is pinned to. None otherwise."""
    from engine.run.affinity import pin_of, waiting_reason

    if status not in ("pending", "running"):
        return None
    held = lease_holder_state(conn, session_id, current_step)
    if held == "waiting":
        return (f"step {current_step} waits for a runner: the one that held it is gone or its lease expired; "
                "a live runner takes it back")
    if held == "running":
        return None
    return waiting_reason(pin_of(params), worker_names(conn))
