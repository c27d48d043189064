"""Soak: thousands of sessions through the inbox while runner processes are killed with SIGKILL
every few seconds, then a check that nothing was lost, nothing ran twice and nothing was left over.

    python bench/soak.py [--sessions 5000] [--kills 100] [--every 0-0.5] [--seconds 900] [--seed N]

Half of the job files are in the inbox before the first runner starts, the rest are dropped while
runners come and go (ingest is killed mid-way too). Each runner life gets either the same stable
runner id (its previous life's steps are taken back at start) or a fresh one (they are taken back
because its process is gone from this host). Every session is three steps that each write a file.
A runner is killed only once it holds a step (a lease of its own), a random 0-0.5 s later, so each
kill lands mid-step (the count of those that did is printed); `--kills` such kills are made. Runs
under the default `max_attempts` (3): a step taken back from a killed runner keeps its attempts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from common import installation  # also puts the repository on sys.path
from tests.helpers import completions, query
from tests.test_recovery import assert_everything_done_once


def drop_files(inbox, names: list[str], pause: float, stop: threading.Event) -> None:
    for name in names:
        if stop.is_set():
            return
        tmp = inbox / f".{name}.tmp"
        tmp.write_text(json.dumps({"workflow": "files3", "params": {"prompt": name}}))
        os.replace(tmp, inbox / name)
        time.sleep(pause)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--every", default="0-0.5", help="seconds from a runner's first claim to its kill, a range")
    parser.add_argument("--kills", type=int, default=100, help="kills that land mid-step")
    parser.add_argument("--seconds", type=float, default=900, help="time budget for the killing phase")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    low, high = (float(x) for x in args.every.split("-"))
    rng = random.Random(args.seed)
    lease = 3.0
    install = installation("soak", {"runner": {"lease_seconds": lease, "heartbeat_seconds": 0.5}})
    inbox = install.config.inbox
    names = [f"soak-{n:05d}.json" for n in range(args.sessions)]
    first, later = names[: len(names) // 2], names[len(names) // 2:]
    drop_files(inbox, first, 0.0, threading.Event())
    stop = threading.Event()
    dropper = threading.Thread(target=drop_files, args=(inbox, later, 0.004, stop), daemon=True)
    env = {**install.env(), "ENGINE_TEST_WRITE_PAUSE": "0.002"}
    started = time.monotonic()
    kills, mid_step, lives, done = 0, 0, 0, 0
    print(f"soak: {args.sessions} sessions x 3 steps in {install.folder}, {args.kills} SIGKILLs mid-step")
    dropper.start()
    while time.monotonic() - started < args.seconds and mid_step < args.kills:
        runner_id = "soak-stable" if rng.random() < 0.5 else f"soak-{lives}"
        process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet", "--runner-id", runner_id],
                                   env=env, cwd=install.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lives += 1
        born = time.time() + lease  # a lease of this life expires after this (an earlier life's, before)
        holds = lambda: query(install, "SELECT count(*) FROM leases WHERE runner_id = :r AND expires_at > :t",
                              r=runner_id, t=born)[0][0] > 0
        deadline = time.monotonic() + 60
        while not holds() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(low, high))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        mid_step += holds()  # its lease outlives it: it died holding a step
        done = query(install, "SELECT count(*) FROM sessions WHERE status = 'completed'")[0][0]
        print(f"  kill {kills:3d} at {time.monotonic() - started:6.1f} s: {done} of {args.sessions} sessions completed",
              flush=True)
        if done == args.sessions and not dropper.is_alive():
            break
    stop.set()
    dropper.join()
    final = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet", "--runner-id", "soak-final"],
                           env=env, cwd=install.folder, capture_output=True, text=True, timeout=1800)
    elapsed = time.monotonic() - started
    assert final.returncode == 0, final.stdout + final.stderr
    dropped = len(first) + len([n for n in later if (inbox / "accepted" / n).exists() or (inbox / n).exists()])
    session_ids = [row[0] for row in query(install, "SELECT session_id FROM sessions")]
    print("checking:")
    assert sorted(p.name for p in (inbox / "accepted").iterdir()) == sorted(names[:dropped])
    print(f"  every one of the {dropped} dropped files was accepted exactly once, none rejected, none left")
    assert not any(p.suffix == ".json" for p in inbox.iterdir())
    assert not (inbox / "rejected").exists() or not any((inbox / "rejected").iterdir())
    assert query(install, "SELECT count(*), count(DISTINCT file_name) FROM jobs") == [(dropped, dropped)]
    assert len(session_ids) == dropped
    print(f"  one session per file: {len(session_ids)}")
    assert_everything_done_once(install, session_ids)
    print(f"  every session completed; each of its {3 * len(session_ids)} steps completed exactly once "
          f"({sum(completions(install).values())} step.completed events); every published file is the "
          "committed attempt's; no attempt folders or temporary files left; the log folds to the live tables")
    retried = query(install, "SELECT count(*) FROM event_log WHERE type = 'step.retried'")[0][0]
    print(f"figures: {kills} SIGKILLs over {lives} runner lives, {mid_step} of them mid-step, {elapsed:.0f} s, "
          f"{len(session_ids) / elapsed:.1f} sessions/s overall, {retried} steps taken back from killed runners")
    return 0


if __name__ == "__main__":
    sys.exit(main())
