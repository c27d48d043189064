"""What fair share costs the claim: 100,000 pending sessions of 100 owners in a SQLite file (a
batch of 1,000 per owner), then claims timed one transaction each, with fair share and without,
on two copies of the same file, side by side in one run.

    python bench/bench_fairshare.py [--owners 100] [--per-owner 1000] [--claims 500] [--out bench/results/fairshare.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import commands  # noqa: E402
from engine.ingest.jobs import parse_job  # noqa: E402
from engine.run import claims  # noqa: E402
from tests.conftest import Installation  # noqa: E402
from tests.helpers import query  # noqa: E402


def fill(folder: Path, owners: int, per_owner: int) -> float:
    install = Installation(folder, settings={"inbox": {"max_batch_items": per_owner}})
    started = time.perf_counter()
    for owner in range(owners):
        job = {"kind": "batch", "workflow": "paint", "owner": f"owner-{owner:03d}", "params": {"prompt": "x"},
               "items": [{} for _ in range(per_owner)]}
        commands.submit(install.store, install.intake, parse_job(job, install.intake.limits),
                        commands.Source(f"o{owner}.json", f"{owner:064x}"))
    install.engine.close()
    return time.perf_counter() - started


def timed_claims(folder: Path, count: int, fair: bool) -> dict:
    install = Installation(folder, settings={"runner": {"fair_share": fair}})
    policy = claims.Policy.from_config(install.config)
    share = claims.FairShare.from_config(install.config)
    batching = install.config.values["batching"]
    took, owners = [], []
    for _ in range(count):
        started = time.perf_counter()
        got = claims.claim_group(install.store, "bench", policy, batching, share=share)
        took.append((time.perf_counter() - started) * 1000)
        owners.append(query(install, "SELECT owner FROM sessions WHERE session_id = :s", s=got[0].session_id)[0][0])
    install.engine.close()
    return {"claims": count, "ms_p50": round(statistics.median(took), 3), "ms_mean": round(statistics.mean(took), 3),
            "ms_p99": round(sorted(took)[int(0.99 * (count - 1))], 3), "distinct_owners_served": len(set(owners))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--owners", type=int, default=100)
    parser.add_argument("--per-owner", type=int, default=1000)
    parser.add_argument("--claims", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    seconds = fill(root / "fair", args.owners, args.per_owner)
    shutil.copytree(root / "fair", root / "plain")
    plain = timed_claims(root / "plain", args.claims, fair=False)
    fair = timed_claims(root / "fair", args.claims, fair=True)
    report = {"pending_sessions": args.owners * args.per_owner, "owners": args.owners, "fill_seconds": round(seconds, 1),
              "plain": plain, "fair_share": fair, "cost_ratio_p50": round(fair["ms_p50"] / plain["ms_p50"], 2),
              "cost_ratio_mean": round(fair["ms_mean"] / plain["ms_mean"], 2)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
