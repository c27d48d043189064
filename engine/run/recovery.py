"""Recovery at runner start: finish what committed, remove what did not, free expired leases.

- An attempt folder whose step completed with that very attempt is published (the crash fell
  between the commit and the renames).
- An attempt folder of an attempt that never committed and holds no lease is removed (also on a
  timer while runners run: `sweep_attempts`).
- Expired leases go back to pending, the attempt counted.
- Ended sessions and batches without result.json / summary.json get them.
"""

from __future__ import annotations

import json
import logging
import re

from engine import queries
from engine.files import leftovers
from engine.run.claims import Policy, reap_expired
from engine.outbox.folders import ATTEMPTS, Outbox
from engine.store import Store

log = logging.getLogger("engine.recovery")
ATTEMPT_NAME = re.compile(r"^r(\d+)-s(\d+)-a(\d+)$")


def recover(store: Store, outbox: Outbox, policy: Policy, dead_runners: list[str] = ()) -> dict[str, int]:
    """Run once when a runner starts. `dead_runners`: runners known to be gone, whose leases are
    taken back at once instead of after expiry: the starting runner's own id (its previous life,
    when a stable --runner-id is given) and runners of this host whose process no longer exists."""
    report = {"reaped": reap_expired(store, policy, dead_runners=dead_runners, orphans=True)}
    report.update(sweep_attempts(store, outbox))
    report["results"] = finish_missing_results(store, outbox)
    return report


def sweep_attempts(store: Store, outbox: Outbox) -> dict[str, int]:
    """Every attempt folder in the outbox: published when its attempt committed, kept while a lease
    for that very attempt exists (it may still commit, even if the lease has expired), else removed:
    without its lease an attempt can never commit (fencing). Runs at start and, on a timer, while
    runners run: a runner killed on another host leaves its folder behind for the others to remove.

    The lease is read before the step: a completion deletes the lease and completes the step in one
    commit, so a lease found gone means the step read after it shows that completion, if any."""
    report = {"published": 0, "removed": 0}
    attempts_root = outbox.root / ATTEMPTS
    if not attempts_root.is_dir():
        return report
    for session_dir in sorted(attempts_root.iterdir()):
        for folder in sorted(session_dir.iterdir()) if session_dir.is_dir() else []:
            match = ATTEMPT_NAME.match(folder.name)
            if not match:
                continue
            run, index, attempt = (int(g) for g in match.groups())
            where = (session_dir.name, index)
            lease, step, session = queries.attempt_state(store, where[0], index)
            if lease is not None and lease.attempt == attempt and lease.run == run:
                continue  # a runner is working in it, or may still commit it
            if step and step["status"] == "completed" and step["attempts"] == attempt and step["run"] == run:
                output = json.loads(step["output"] or "{}")
                if _tried(outbox.publish, folder, outbox.dir_of(dict(session)),
                          output.get("images", []) + output.get("files", [])):
                    report["published"] += 1
            else:
                outbox.discard(folder)
                report["removed"] += 1
        try:
            session_dir.rmdir()
        except OSError:
            pass
    return report


def finish_missing_results(store: Store, outbox: Outbox) -> int:
    """Ended sessions and batches get the result.json / summary.json a crash kept them from."""
    ended, ended_batches = queries.ended_targets(store)
    written = 0
    for row in ended:
        if _missing(outbox.dir_of(row) / "result.json"):
            written += _tried(outbox.write_result, store, row["session_id"])
    for batch_id in ended_batches:
        if _missing(outbox.batch_dir(batch_id) / "summary.json"):
            written += _tried(outbox.write_summary, store, batch_id)
    return written


def _tried(write, *args) -> bool:
    """An outbox write that may fail for want of space or permission: logged, done at a later start."""
    try:
        write(*args)
        return True
    except OSError as exc:
        log.warning("recovery could not write to the outbox: %s", exc)
        return False


def _missing(path) -> bool:
    """Whether path is absent; a temporary file of a write cut short beside it is removed."""
    for leftover in leftovers(path):
        try:
            leftover.unlink(missing_ok=True)
        except OSError:
            pass
    return not path.exists()
