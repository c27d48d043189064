"""Inbox speed: 1,000 job files dropped at once (seconds until all are sessions), and one file
renamed into a watched inbox (time until its session row exists).

    python bench/bench_inbox.py [--files 1000] [--singles 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import installation, line

from tests.helpers import query


def job(n: int) -> bytes:
    return json.dumps({"workflow": "noop1", "params": {"prompt": f"picture {n}", "seed": n}}).encode()


def wait_for_sessions(install, count: int, timeout: float = 120) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if query(install, "SELECT count(*) FROM sessions")[0][0] >= count:
            return time.perf_counter()
        time.sleep(0.002)
    raise TimeoutError(f"{count} sessions did not appear")


def burst(files: int, synchronous: str) -> float:
    install = installation(f"burst-{synchronous}", {"database": {"synchronous": synchronous}})
    inbox = install.engine.inbox()
    inbox.start()
    time.sleep(0.3)
    staging = install.folder / "staging"
    staging.mkdir()
    for n in range(files):
        (staging / f"job-{n:05d}.json").write_bytes(job(n))
    started = time.perf_counter()
    for n in range(files):  # write-then-rename, as clients should
        os.rename(staging / f"job-{n:05d}.json", install.config.inbox / f"job-{n:05d}.json")
    done = wait_for_sessions(install, files)
    inbox.stop()
    install.store.close()
    return files / (done - started)


def singles(count: int) -> list[float]:
    install = installation("single")
    inbox = install.engine.inbox()
    inbox.start()
    time.sleep(0.3)
    latencies = []
    for n in range(count):
        tmp = install.folder / f"tmp-{n}.json"
        tmp.write_bytes(job(n))
        started = time.perf_counter()
        os.rename(tmp, install.config.inbox / f"single-{n}.json")
        latencies.append(wait_for_sessions(install, n + 1) - started)
        time.sleep(0.05)
    inbox.stop()
    install.store.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=40)
    args = parser.parse_args()
    print(f"{args.files:,} job files renamed into a watched inbox at once")
    for synchronous in ("FULL", "NORMAL"):
        line(f"files/s until all are sessions, synchronous={synchronous}", burst(args.files, synchronous), "files/s",
             "goal >= 500" if synchronous == "FULL" else "")
    latencies = singles(args.singles)
    print(f"one file renamed into the inbox, {args.singles} times: until its session row exists")
    line("p50", statistics.median(latencies) * 1000, "ms", "goal < 50 ms")
    line("p90", sorted(latencies)[int(len(latencies) * 0.9)] * 1000, "ms")


if __name__ == "__main__":
    main()
