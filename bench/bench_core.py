"""Core speed: no-op steps/s at synchronous FULL and NORMAL beside the raw SQLite commit rate on
the same disk, rebuild speed over 1,000,000 events, and status look-ups among 100,000 sessions.

    python bench/bench_core.py [--events 1000000] [--steps 3000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import time
from pathlib import Path

from common import installation, line

from engine.store.tables import events
from tests.helpers import query, run_until_idle, submit


def raw_commit_rate(folder: Path, synchronous: str, rows: int = 3000) -> float:
    path = folder / f"raw-{synchronous}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data TEXT)")
    started = time.perf_counter()
    for n in range(rows):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (data) VALUES (?)", (f"row {n}",))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return rows / elapsed


def engine_steps_rate(synchronous: str, steps: int) -> tuple[float, float]:
    install = installation(f"noop-{synchronous}", {"database": {"synchronous": synchronous}})
    sessions = steps // 3
    for _ in range(sessions):
        submit(install, {"workflow": "noop3"})
    raw = raw_commit_rate(install.folder, synchronous)
    started = time.perf_counter()
    done = run_until_idle(install)
    elapsed = time.perf_counter() - started
    assert done == sessions * 3
    install.store.close()
    return done / elapsed, raw


def real_event_templates(install) -> list[list[dict]]:
    """Event streams of real sessions (noop3), to be cloned into a long log."""
    for priority in range(50):
        submit(install, {"workflow": "noop3", "priority": priority % 5})
    run_until_idle(install)
    streams: dict[str, list[dict]] = {}
    for row in query(install, "SELECT stream_id, seq, type, data, created_at FROM events "
                              "WHERE stream_type = 'session' ORDER BY event_id"):
        streams.setdefault(row[0], []).append({"seq": row[1], "type": row[2], "data": row[3], "created_at": row[4]})
    return list(streams.values())


def fill_log(install, target_events: int, running_every: int = 2000) -> int:
    """Append cloned session streams until the log holds target_events; some sessions stay running."""
    templates = real_event_templates(install)
    written = query(install, "SELECT count(*) FROM events")[0][0]
    batch: list[dict] = []
    n = 0
    with install.store.writer.begin() as conn:
        while written < target_events:
            template = templates[n % len(templates)]
            session_id = f"ses-bench{n:010d}"
            old_id = json.loads(template[0]["data"])["session_id"]
            stream = template if n % running_every else template[:3]  # created, started, claimed: running
            for event in stream:
                batch.append({"stream_type": "session", "stream_id": session_id, "seq": event["seq"],
                              "type": event["type"], "data": event["data"].replace(old_id, session_id),
                              "created_at": event["created_at"]})
            written += len(stream)
            n += 1
            if len(batch) >= 20000:
                conn.execute(events.insert(), batch)
                batch = []
        if batch:
            conn.execute(events.insert(), batch)
    return written


def timed_lookups(install, sql: str, params_list: list[dict]) -> float:
    times = []
    for params in params_list:
        started = time.perf_counter()
        query(install, sql, **params)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()

    print("no-op steps through the engine (runner claims, completes and claims the next in one commit)")
    for synchronous in ("FULL", "NORMAL"):
        rate, raw = engine_steps_rate(synchronous, args.steps)
        line(f"engine steps/s, synchronous={synchronous}", rate, "steps/s",
             "goal >= 1,000" if synchronous == "FULL" else "")
        line(f"raw SQLite single-row commits/s, synchronous={synchronous}", raw, "commits/s")
        line(f"ratio engine steps / raw commits, synchronous={synchronous}", rate / raw, "", digits=3)

    print(f"rebuild: replaying {args.events:,} events")
    install = installation("rebuild", {"database": {"synchronous": "NORMAL"}})
    total = fill_log(install, args.events)
    started = time.perf_counter()
    projection = install.store.fold_log()
    fold = time.perf_counter() - started
    started = time.perf_counter()
    counts = install.store.rebuild()
    full = time.perf_counter() - started
    line("events in the log", total, "events")
    line("fold only (read + reduce), events/s", total / fold, "events/s", "goal >= 50,000")
    line("engine rebuild (fold + drop + write tables), events/s", total / full, "events/s", "goal >= 50,000")
    sessions = counts["sessions"]
    del projection

    print(f"status look-ups among {sessions:,} sessions (median of 300, plain SQL on the views)")
    ids = [r[0] for r in query(install, "SELECT session_id FROM sessions ORDER BY random() LIMIT 300")]
    by_id = timed_lookups(install, "SELECT * FROM session_status WHERE session_id = :id", [{"id": i} for i in ids])
    running = timed_lookups(install, "SELECT * FROM session_status WHERE status = 'running'", [{}] * 300)
    count_running = query(install, "SELECT count(*) FROM session_status WHERE status = 'running'")[0][0]
    line("one session by id", by_id, "ms", "goal < 5 ms")
    line(f"the list of running sessions ({count_running} rows)", running, "ms", "goal < 5 ms")
    install.store.close()


if __name__ == "__main__":
    main()
