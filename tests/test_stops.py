"""The engine's own crashes never fail a job: a step taken back after its runner died keeps its
attempt (a recovery, counted apart), and only a step that kills its runner again and again fails,
with its own code. Real runner processes, killed with SIGKILL in the middle of a step."""

from __future__ import annotations

import json
import signal

from tests.conftest import Installation
from tests.helpers import query, submit
from tests.test_hardening import run_until_idle, wait_for, watch


def kill_mid_step(install, session_id: str, kills: int) -> None:
    """Start a runner, SIGKILL it while it holds the sleep step, `kills` times over."""
    for number in range(kills):
        process = watch(install, "--runner-id", f"doomed-{number}")
        wait_for(lambda: query(install, "SELECT count(*) FROM leases WHERE session_id = :id AND step_index = 1 "
                                        "AND runner_id = :r", id=session_id, r=f"doomed-{number}") == [(1,)],
                 seconds=60, what=f"life {number} running the sleep step")
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()


def test_a_step_taken_back_after_its_runner_died_keeps_its_attempts(tmp_path):
    install = Installation(tmp_path / "engine", settings={"runner": {"max_attempts": 1, "lease_seconds": 120.0}})
    try:
        session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 60}}).target_id  # a 6 s step
        kill_mid_step(install, session_id, 3)
        run_until_idle(install)  # takes the step back at once (the killed runners were on this host)
        assert query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session_id) == [("completed",)]
        assert query(install, "SELECT attempts, recoveries FROM steps WHERE session_id = :id AND step_index = 1",
                     id=session_id) == [(4, 3)]
        retried = [e.data for e in install.store.stream("session", session_id) if e.type == "step.retried"]
        assert [(r["code"], r["recovery"]) for r in retried] == [("RUNNER_LOST", True)] * 3
        assert install.store.verify() == []
    finally:
        install.store.close()


def test_a_step_that_kills_its_runner_every_time_fails_past_max_recoveries_saying_so(tmp_path):
    install = Installation(tmp_path / "engine", settings={"runner": {"max_recoveries": 2, "lease_seconds": 120.0}})
    try:
        session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 60}}).target_id
        kill_mid_step(install, session_id, 3)
        run_until_idle(install)
        (status, code, message), = query(install, "SELECT status, error_code, error_message FROM session_status "
                                                  "WHERE session_id = :id", id=session_id)
        assert (status, code) == ("failed", "RUNNER_LOST")
        assert "3 times" in message and "max_recoveries" in message and "kills its runner" in message
        result = json.loads((install.config.outbox / session_id / "result.json").read_text())
        assert result["status"] == "failed" and result["error"]["code"] == "RUNNER_LOST"
    finally:
        install.store.close()
