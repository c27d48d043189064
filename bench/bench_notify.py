"""Webhooks never slow generation: 1,000 sessions run by a real `engine run`, once with no
webhooks and once with every session's completion sent to a receiver that takes 2 s to answer,
side by side in one run. Throughput is sessions completed per second, from the first step
claimed to the last session completed (the events' own times).

    python bench/bench_notify.py [--sessions 1000] [--answer-seconds 2] [--out bench/results/notify.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import commands  # noqa: E402
from engine.ingest.jobs import parse_job  # noqa: E402
from tests.conftest import Installation  # noqa: E402
from tests.helpers import query  # noqa: E402
from tests.receiver import Receiver  # noqa: E402

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def one_run(folder: Path, sessions: int, receiver: Receiver | None) -> dict:
    install = Installation(folder, settings={"notify": {"secret": SECRET, "allow_private": True,
                                                        "timeout_seconds": 10.0}})
    for n in range(sessions):
        job = {"workflow": "noop3", "params": {"prompt": f"p{n}"}}
        if receiver:
            job["notify"] = {"url": receiver.url}
        commands.submit(install.store, install.intake, parse_job(job, install.intake.limits),
                        commands.Source(f"n{n}.json", f"{n:064x}"))
    runner = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet"], env=install.env(),
                              cwd=install.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while query(install, "SELECT count(*) FROM sessions WHERE status = 'completed'")[0][0] < sessions:
            time.sleep(0.2)
        first = query(install, "SELECT min(created_at) FROM events WHERE type = 'step.claimed'")[0][0]
        last = query(install, "SELECT max(created_at) FROM events WHERE type = 'session.completed'")[0][0]
        delivered = query(install, "SELECT count(*) FROM deliveries WHERE status = 'delivered'")[0][0]
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=120)
        install.engine.close()
    seconds = _epoch(last) - _epoch(first)
    return {"sessions": sessions, "seconds": round(seconds, 2), "sessions_per_second": round(sessions / seconds, 1),
            "delivered_by_then": delivered}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--answer-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    receiver = Receiver(["stall"] * (args.sessions * 2), stall_seconds=args.answer_seconds)
    try:
        plain = one_run(folder / "plain", args.sessions, None)
        hooked = one_run(folder / "hooked", args.sessions, receiver)
    finally:
        receiver.close()
    report = {"without_webhooks": plain, "with_webhooks": hooked, "answer_seconds": args.answer_seconds,
              "throughput_ratio": round(hooked["sessions_per_second"] / plain["sessions_per_second"], 3)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
