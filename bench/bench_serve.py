"""`engine serve` under load: many clients submitting at once (repeated Idempotency-Keys mixed in)
and many Server-Sent Events subscribers, against a real uvicorn process (`--no-runner`: the
submit path alone is timed; the submitted jobs are no-op test workflows).

    python bench/bench_serve.py [--clients 50] [--submissions 1000] [--repeats 0.2] [--subscribers 100]

Prints JSON: submissions/s, submit latency p50/p99 (ms), statuses, whether every distinct key is
exactly one job, and each subscriber's events: all, in order, and p99 from commit to subscriber.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import Installation  # noqa: E402
from tests.helpers import query  # noqa: E402
from tests.test_serve import Served  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def submissions(url: str, clients: int, total: int, repeats: float, seed: int) -> dict:
    rng = random.Random(seed)
    keys: list[str] = []
    plan = []
    for n in range(total):
        if keys and rng.random() < repeats:
            plan.append(rng.choice(keys))
        else:
            keys.append(f"bench-{seed}-{n}")
            plan.append(keys[-1])
    latencies, statuses, answers, lock = [], {}, {}, threading.Lock()
    chunks = [plan[i::clients] for i in range(clients)]

    def client(chunk: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for key in chunk:
                started = time.perf_counter()
                response = http.post("/v1/jobs", json={"workflow": "noop1", "params": {"prompt": key}},
                                     headers={"Idempotency-Key": key})
                took = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(took)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code in (200, 201):
                        answers.setdefault(key, set()).add(response.json()["session_id"])

    threads = [threading.Thread(target=client, args=(chunk,)) for chunk in chunks]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"submissions": total, "distinct_keys": len(keys), "clients": clients, "seconds": round(seconds, 2),
            "submissions_per_s": round(total / seconds, 1), "p50_ms": round(percentile(latencies, 0.5), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1), "statuses": statuses,
            "one_session_per_key": all(len(ids) == 1 for ids in answers.values()) and len(answers) == len(keys)}


def subscribers(url: str, count: int, events_wanted: int) -> tuple[list[threading.Thread], list[list]]:
    seen: list[list] = [[] for _ in range(count)]
    ready = threading.Barrier(count + 1)

    def listen(number: int) -> None:
        with httpx.stream("GET", f"{url}/v1/events", timeout=120) as response:
            lines = response.iter_lines()
            next(lines)  # the opening comment: subscribed
            ready.wait()
            event_id = None
            for line in lines:
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: ") and event_id is not None:
                    created = json.loads(line[6:])["created_at"]
                    seen[number].append((event_id, time.time(), created))
                    event_id = None
                    if len(seen[number]) >= events_wanted:
                        return

    threads = [threading.Thread(target=listen, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    return threads, seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--repeats", type=float, default=0.2)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    install = Installation(folder / "engine")
    server = Served(install, "--no-runner")
    try:
        report = {"submit_one_client": submissions(server.url, 1, 200, 0.0, args.seed)}
        before = query(install, "SELECT count(*) FROM sessions")[0][0]
        report["submit"] = submissions(server.url, args.clients, args.submissions, args.repeats, args.seed + 1)
        report["submit"]["sessions_in_store"] = query(install, "SELECT count(*) FROM sessions")[0][0] - before
        # Each submission appends two events (session.created, job.received).
        jobs = 100
        threads, seen = subscribers(server.url, args.subscribers, 2 * jobs)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for n in range(jobs):
                http.post("/v1/jobs", json={"workflow": "noop1", "params": {"prompt": f"sse-{n}"}})
        for thread in threads:
            thread.join(timeout=60)
        latencies, complete, ordered = [], 0, 0
        for got in seen:
            ids = [event_id for event_id, _, _ in got]
            complete += len(ids) == 2 * jobs
            ordered += ids == sorted(ids) and len(set(ids)) == len(ids)
            for _, arrived, created in got:
                committed = datetime.strptime(created, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
                latencies.append((arrived - committed) * 1000)
        report["events"] = {"subscribers": args.subscribers, "events_each": 2 * jobs, "all_arrived": complete,
                            "in_order_without_repeats": ordered, "p50_ms": round(percentile(latencies, 0.5), 1),
                            "p99_ms": round(percentile(latencies, 0.99), 1)}
    finally:
        server.stop()
        install.engine.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
