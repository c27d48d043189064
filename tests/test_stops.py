"""The engine's own crashes never fail a job: a step taken back after its runner died keeps its
attempt (a recovery, counted apart), and only a step that kills its runner again and again fails,
with its own code. Real runner processes, killed with SIGKILL in the middle of a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import Installation
from tests.helpers import completions, event_types, query, submit
from tests.test_hardening import engine, run_until_idle, wait_for, watch


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


def running_step(install, session_id: str, runner_id: str, progress: bool = True) -> None:
    """Until this runner holds the long step (with `progress`, until its lease carries the step's
    own progress: the handler is in its loop and the runner is watching it)."""
    ticking = " AND message LIKE 'tick%'" if progress else ""
    wait_for(lambda: query(install, "SELECT count(*) FROM leases WHERE session_id = :id AND step_index = 1 "
                                    f"AND runner_id = :r{ticking}", id=session_id, r=runner_id) == [(1,)],
             seconds=60, what=f"{runner_id} running the long step")


def stopped(process, seconds: float = 30) -> tuple[int, str, float]:
    started = time.monotonic()
    process.wait(timeout=seconds)
    logged = process.stderr.read().decode()
    process.stderr.close()
    return process.returncode, logged, time.monotonic() - started


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_mid_step_says_so_hands_the_step_back_unused_and_exits_cleanly(tmp_path, signum):
    install = Installation(tmp_path / "engine", settings={"runner": {"max_attempts": 1, "lease_seconds": 120.0}})
    try:
        session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 150}}).target_id  # a 15 s step
        process = watch(install, "--runner-id", "stopped-one")
        running_step(install, session_id, "stopped-one")
        process.send_signal(signum)
        code, logged, seconds = stopped(process)
        assert code == 0 and seconds < 15, (code, seconds, logged)
        assert f"{signal.Signals(signum).name}: stopping" in logged and "handed back" in logged
        assert "terminate called" not in logged and "Traceback" not in logged
        assert query(install, "SELECT status, attempts FROM steps WHERE session_id = :id AND step_index = 1",
                     id=session_id) == [("pending", 0)], "handed back, its attempt unused"
        released = [e.data["reason"] for e in install.store.stream("session", session_id) if e.type == "step.released"]
        assert released == ["stopping"]
        assert query(install, "SELECT count(*) FROM leases") == [(0,)]
    finally:
        install.store.close()


def test_a_second_signal_or_the_stop_timeout_exits_at_once_and_hands_the_step_back(tmp_path):
    install = Installation(tmp_path / "engine", settings={"runner": {"lease_seconds": 120.0,
                                                                     "stop_timeout_seconds": 2.0}})
    try:
        session_id = submit(install, {"workflow": "deaf", "params": {"steps": 150}}).target_id  # deaf for 15 s
        process = watch(install, "--runner-id", "twice")
        running_step(install, session_id, "twice", progress=False)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        code, logged, seconds = stopped(process)
        assert code == 130 and seconds < 10, (code, seconds, logged)
        assert "stopping at once (a second SIGINT): 1 running step(s) handed back" in logged
        assert "terminate called" not in logged and "Traceback" not in logged
        assert query(install, "SELECT status FROM steps WHERE session_id = :id AND step_index = 1",
                     id=session_id) == [("pending",)]
        assert query(install, "SELECT status FROM runner_status WHERE runner_id = 'twice'") == [("stopped",)]
        process = watch(install, "--runner-id", "timed")
        running_step(install, session_id, "timed", progress=False)
        process.send_signal(signal.SIGTERM)
        code, logged, seconds = stopped(process)
        assert code == 143 and 1.5 < seconds < 10, (code, seconds, logged)
        assert "stopping at once (2 s after SIGTERM)" in logged
        assert query(install, "SELECT status, recoveries FROM steps WHERE session_id = :id AND step_index = 1",
                     id=session_id) == [("pending", 2)]
    finally:
        install.store.close()


def test_sigint_sigkill_sigterm_sigkill_sigint_sigkill_in_one_long_step_end_with_the_job_completed_once(tmp_path):
    install = Installation(tmp_path / "engine", settings={"runner": {"max_attempts": 1, "lease_seconds": 120.0}})
    try:
        session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 100}}).target_id  # a 10 s step
        said: list[str] = []  # what each life logged: a failure below says how the lives before it ended
        for number, signum in enumerate([signal.SIGINT, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL,
                                         signal.SIGINT, signal.SIGKILL]):
            process = watch(install, "--runner-id", f"life-{number}")
            try:
                running_step(install, session_id, f"life-{number}")
            except AssertionError as failure:
                process.kill()
                raise AssertionError(f"{failure}; events: {event_types(install, session_id)}; the lives before "
                                     f"said: {said}") from None
            process.send_signal(signum)
            code, logged, _ = stopped(process)
            said.append(logged[-1500:])
            assert code == (-9 if signum == signal.SIGKILL else 0), logged
        assert query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session_id) == [("running",)]
        run_until_idle(install)
        assert query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session_id) == [("completed",)]
        assert all(count == 1 for count in completions(install).values()) and len(completions(install)) == 3
        assert install.store.verify() == []
    finally:
        install.store.close()


def test_a_session_paused_inside_a_shared_call_publishes_nothing_and_runs_its_step_again_when_resumed(tmp_path):
    install = Installation(tmp_path / "engine", settings={"batching": {"max_wait_ms": 3000}})
    try:
        ids = [submit(install, {"workflow": "grouped", "params": {"steps": 4}}).target_id for _ in range(3)]
        process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], cwd=install.folder,
                                   env={**install.env(), "ENGINE_TEST_WRITE_PAUSE": "4"}, stderr=subprocess.PIPE)
        wait_for(lambda: query(install, "SELECT count(*) FROM leases WHERE step_index = 1") == [(3,)], seconds=60,
                 what="the three sessions in one call")
        paused = ids[1]
        assert engine(install, "pause", paused).returncode == 0
        code, _, _ = stopped(process, 60)
        assert code == 0
        assert [query(install, "SELECT status FROM sessions WHERE session_id = :id", id=i)[0][0] for i in ids] == [
            "completed", "paused", "completed"]
        assert query(install, "SELECT status, attempts FROM steps WHERE session_id = :id AND step_index = 1",
                     id=paused) == [("pending", 0)]
        assert not (install.config.outbox / paused / "step-1.txt").exists(), "nothing of it was published"
        shared = (install.config.outbox / ids[0] / "step-1.txt").read_text()
        assert shared.endswith("of 3\n"), "the others' call went on with all three"
        assert engine(install, "resume", paused).returncode == 0
        run_until_idle(install)
        again = (install.config.outbox / paused / "step-1.txt").read_text()
        assert query(install, "SELECT status FROM sessions WHERE session_id = :id", id=paused) == [("completed",)]
        assert again.endswith("of 1\n") and again.split(" call ")[1] != shared.split(" call ")[1]
    finally:
        install.store.close()


@pytest.mark.postgres
def test_backends_killed_every_third_of_a_second_leave_every_session_completed_once_and_both_runners_alive(tmp_path):
    import threading

    from sqlalchemy import create_engine, text

    from tests.conftest import POSTGRES_URL, _drop, _postgres_database

    if not POSTGRES_URL:
        pytest.skip("ENGINE_TEST_POSTGRES_URL is not set")
    admin, name, url = _postgres_database()
    install = Installation(tmp_path / "engine", database_url=url, settings={"runner": {"max_attempts": 1}})
    killer = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    stop, kills = threading.Event(), []

    def kill_backends() -> None:
        with killer.connect() as conn:
            while not stop.wait(0.3):
                kills.append(conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :d "
                    "AND pid <> pg_backend_pid()"), {"d": name}).scalar())

    def ended() -> bool:
        try:
            return query(install, "SELECT count(*) FROM sessions WHERE status IN ('pending', 'running')") == [(0,)]
        except Exception:  # our own connection was killed too
            return False

    processes = []
    try:
        count = int(os.environ.get("ENGINE_TEST_FAULT_SESSIONS", "16"))  # 48: backends killed for about a minute
        ids = [submit(install, {"workflow": "sleepy", "params": {"steps": 20}}).target_id for _ in range(count)]  # 2 s
        processes = [watch(install, "--runner-id", f"r{n}") for n in range(2)]
        thread = threading.Thread(target=kill_backends, daemon=True)
        thread.start()
        wait_for(ended, seconds=240, what="every session ending while backends are killed")
        stop.set()
        thread.join()
        assert sum(kills) > 20, kills
        assert all(p.poll() is None for p in processes), "both runners alive"
        statuses = query(install, "SELECT status, count(*) FROM sessions GROUP BY status")
        failed = query(install, "SELECT error_message FROM sessions WHERE status = 'failed'")
        assert statuses == [("completed", len(ids))], (statuses, failed)
        assert sorted(completions(install).values()) == [1] * (3 * len(ids)), "every step completed once"
        assert install.store.verify() == []
    finally:
        stop.set()
        logs = []
        for process in processes:
            process.send_signal(signal.SIGTERM)
            code, logged, _ = stopped(process, 60)
            logs.append(logged)
        install.store.close()
        killer.dispose()
        _drop(admin, name)
    assert all("Traceback" not in logged for logged in logs), logs[0][-3000:]
    troubles = [[line for line in logged.splitlines() if " ERROR " in line or " WARNING " in line] for logged in logs]
    assert all(len(lines) < 30 for lines in troubles), ("a few lines, not a flood", troubles)


def test_trouble_that_repeats_is_one_line_when_it_starts_a_summary_every_half_minute_and_one_when_it_ends():
    import logging

    from engine.outage import Outage

    now, said = [0.0], []
    logger = logging.getLogger("tests.outage")
    logger.propagate, logger.level = False, logging.WARNING
    logger.handlers = [logging.Handler()]
    logger.handlers[0].emit = said.append
    outage = Outage(logger, "writing the store", clock=lambda: now[0])
    for tick in range(90_000):  # 90 s of failures, a thousand a second
        now[0] = tick / 1000
        outage.failed(OSError("database or disk is full"), traceback=False)
        if tick % 100 == 50:
            outage.ok()  # works now and then in between: the same outage
    now[0] = 91.0
    outage.ok()  # too soon to say it ended
    now[0] = 96.0
    outage.ok()
    outage.ok()  # nothing more to say
    lines = [r.getMessage() for r in said]
    assert len(lines) == 4, lines  # the start, summaries at 30 and 60 s, the end
    assert "failed: OSError: database or disk is full" in lines[0]
    assert "works again: 90000 failures over 90 s" in lines[-1]


def test_a_runner_that_cannot_reach_its_database_says_so_in_a_line_and_keeps_trying(tmp_path):
    install = Installation(tmp_path / "engine")
    install.store.close()
    nowhere = {"ENGINE_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:9/nowhere",
               "ENGINE_DATABASE_RECONNECT_SECONDS": "2"}
    done = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], cwd=install.folder,
                          env={**install.env(), **nowhere}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("DATABASE_UNAVAILABLE: cannot reach the database"), lines
    keeps = watch(install, env=nowhere)
    time.sleep(4)
    assert keeps.poll() is None, "engine run keeps trying"
    keeps.send_signal(signal.SIGTERM)
    code, logged, _ = stopped(keeps)
    assert code == 0 and "Traceback" not in logged and len(logged.strip().splitlines()) <= 4, logged
