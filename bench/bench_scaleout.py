"""Scale-out: no-op steps/s with 1, 2 and 4 runner processes on one PostgreSQL database, beside one
runner on SQLite (synchronous FULL), all in one run on this machine.

Each configuration gets a fresh database and `--steps` no-op steps (noop3 sessions), then starts
its runners as real `engine run --until-idle` processes. The rate is measured inside the event log
(first step claimed to last step completed), so process start-up is not counted. CPU use of the
runners and of PostgreSQL is sampled with psutil to show what limits the curve.

    python bench/bench_scaleout.py [--steps 3000] [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
from common import ROOT, installation, line

import tests.conftest as conftest
from tests.helpers import query, submit

RESULTS = ROOT / "bench" / "results"


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _postgres_cpu(seen: dict[int, float]) -> None:
    """CPU seconds of every PostgreSQL process, by pid, as last seen (a backend exits with its
    connection: sampling keeps what it used)."""
    for process in psutil.process_iter(["name", "cpu_times"]):
        if process.info["name"] and process.info["name"].startswith("postgres") and process.info["cpu_times"]:
            seen[process.pid] = process.info["cpu_times"].user + process.info["cpu_times"].system


def measure(label: str, runners: int, steps: int, postgres: str | None) -> dict:
    url = ""
    admin = name = None
    if postgres:
        conftest.POSTGRES_URL = postgres
        admin, name, url = conftest._postgres_database()
    install = installation(label.replace(" ", "-"), {"database": {"url": url, "synchronous": "FULL"}})
    try:
        for _ in range(steps // 3):
            submit(install, {"workflow": "noop3"})
        pg_before: dict[int, float] = {}
        pg_seen: dict[int, float] = {}
        if postgres:
            _postgres_cpu(pg_before)
        started = time.perf_counter()
        logs = [(install.folder / f"runner-{n}.log").open("wb") for n in range(runners)]
        processes = [subprocess.Popen([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet",
                                       "--runner-id", f"bench-{n}"], env=install.env(), cwd=install.folder,
                                      stdout=log, stderr=subprocess.STDOUT) for n, log in enumerate(logs)]
        watched = [psutil.Process(p.pid) for p in processes]
        cpu = {p.pid: 0.0 for p in watched}
        while any(p.poll() is None for p in processes):
            for process in watched:
                try:
                    times = process.cpu_times()
                    cpu[process.pid] = times.user + times.system
                except psutil.Error:
                    pass
            if postgres:
                _postgres_cpu(pg_seen)
            time.sleep(0.1)
        wall = time.perf_counter() - started
        for n, process in enumerate(processes):
            logs[n].close()
            assert process.returncode == 0, (install.folder / f"runner-{n}.log").read_text()[-2000:]
        (first,), (last,) = (query(install, "SELECT min(created_at) FROM events WHERE type = 'step.claimed'")[0],), \
            (query(install, "SELECT max(created_at) FROM events WHERE type = 'step.completed'")[0],)
        done = query(install, "SELECT count(*) FROM events WHERE type = 'step.completed'")[0][0]
        assert done == steps // 3 * 3, f"{done} steps completed of {steps}"
        per_runner = query(install, "SELECT data FROM events WHERE type = 'step.claimed'")
        shares: dict[str, int] = {}
        for (data,) in per_runner:
            runner_id = json.loads(data)["runner_id"]
            shares[runner_id] = shares.get(runner_id, 0) + 1
        span = _timestamp(last[0]) - _timestamp(first[0])
        result = {"label": label, "runners": runners, "database": "postgresql" if postgres else "sqlite FULL",
                  "steps": done, "seconds": round(span, 3), "steps_per_s": round(done / span, 1),
                  "wall_seconds_with_start_up": round(wall, 2),
                  "runner_cpu_seconds": round(sum(cpu.values()), 2),
                  "postgres_cpu_seconds": round(sum(t - pg_before.get(pid, 0.0) for pid, t in pg_seen.items()), 2)
                  if postgres else None,
                  "claims_per_runner": sorted(shares.values(), reverse=True)}
        return result
    finally:
        install.store.close()
        if admin is not None:
            conftest._drop(admin, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--postgres", default=os.environ.get("ENGINE_TEST_POSTGRES_URL",
                                                             "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--out", default=str(RESULTS / "scaleout-cpu.json"))
    args = parser.parse_args()
    runs = [measure("1 runner, SQLite FULL", 1, args.steps, None)]
    for runners in (1, 2, 4):
        runs.append(measure(f"{runners} runner(s), PostgreSQL", runners, args.steps, args.postgres))
    print(f"no-op steps/s, {args.steps} steps each, {psutil.cpu_count()} CPU cores")
    for run in runs:
        line(run["label"], run["steps_per_s"], "steps/s",
             f"runner CPU {run['runner_cpu_seconds']} s, postgres CPU {run['postgres_cpu_seconds']} s over "
             f"{run['seconds']} s; claims {run['claims_per_runner']}")
    summary = {"machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
               "command": "python bench/bench_scaleout.py " + " ".join(sys.argv[1:]), "runs": runs}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
