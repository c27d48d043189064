"""The runner and the store, run against SQLite and PostgreSQL alike: claiming, leases, fencing,
retries, pause and cancel, rebuild."""

from __future__ import annotations

import threading
import time

import pytest

from engine import commands
from engine.run import claims
from engine.errors import StaleLease
from engine.run.claims import Policy
from tests.helpers import claim_one, completions, event_types, query, run_until_idle, runner, status, submit


def test_sessions_run_to_completion_and_the_log_rebuilds_the_same_tables(backend_install):
    install = backend_install
    ids = [submit(install, {"workflow": "noop3"}).target_id for _ in range(5)]
    assert run_until_idle(install) == 15
    assert {status(install, i) for i in ids} == {"completed"}
    assert set(completions(install).values()) == {1}
    assert event_types(install, ids[0]) == [
        "session.created", "session.started", "step.claimed", "step.completed", "step.claimed", "step.completed",
        "step.claimed", "step.completed", "session.completed"]
    assert install.store.verify() == []
    before = query(install, "SELECT * FROM sessions ORDER BY session_id")
    install.store.rebuild()
    assert query(install, "SELECT * FROM sessions ORDER BY session_id") == before


def test_the_highest_priority_then_the_oldest_runs_first(backend_install):
    install = backend_install
    low = submit(install, {"workflow": "noop1", "priority": 1}).target_id
    old = submit(install, {"workflow": "noop1", "priority": 9}).target_id
    new = submit(install, {"workflow": "noop1", "priority": 9}).target_id
    order = []
    run_until_idle(install, on_step=lambda claim, outcome: order.append(claim.session_id))
    assert order == [old, new, low]


def test_a_runner_that_lost_its_lease_cannot_record_its_result(backend_install):
    install = backend_install
    policy = Policy.from_config(install.config)
    session_id = submit(install, {"workflow": "noop1"}).target_id
    stale = claim_one(install.store, "runner-a", policy)
    assert claims.reap_expired(install.store, policy, now=time.time() + 3600) == 1
    time.sleep(0.1)  # the retry's backoff
    fresh = claim_one(install.store, "runner-b", policy)
    assert (fresh.session_id, fresh.attempt) == (session_id, 2)
    with pytest.raises(StaleLease):
        install.store.write(lambda tx: claims.complete_in(tx, stale, {}, 0.1))
    install.store.write(lambda tx: claims.complete_in(tx, fresh, {}, 0.1))
    assert status(install, session_id) == "completed"
    assert list(completions(install).values()) == [1]
    owned, _ = claims.heartbeat_all(install.store, [stale], policy)[0]
    assert not owned


def test_one_heartbeat_renews_each_claim_of_a_call_and_says_which_it_lost(backend_install):
    install = backend_install
    policy = Policy.from_config(install.config)
    for _ in range(3):
        submit(install, {"workflow": "noop1"})
    first = [claim_one(install.store, "runner-a", policy) for _ in range(3)]
    assert claims.reap_expired(install.store, policy, now=time.time() + 3600) == 3  # every lease lapses
    time.sleep(0.1)  # the retries' backoff
    again = {c.session_id: c for c in (claim_one(install.store, "runner-a", policy) for _ in range(3))}
    call = [again[first[0].session_id], first[1], again[first[2].session_id]]
    states = claims.heartbeat_all(install.store, call, policy, 0.4, "denoising 12/30")
    assert [owned for owned, _ in states] == [True, False, True], "the lapsed first attempt is not renewed"
    assert [status for _, status in states] == ["running"] * 3
    assert query(install, "SELECT session_id, progress FROM leases ORDER BY session_id") == sorted(
        (c.session_id, 0.0 if c.session_id == first[1].session_id else 0.4) for c in again.values()), \
        "progress recorded on each renewed lease, and on no other"


def test_failures_are_retried_with_backoff_then_fail_the_session(backend_install):
    install = backend_install
    flaky = submit(install, {"workflow": "flaky", "params": {"seed": 2}}).target_id
    broken = submit(install, {"workflow": "broken"}).target_id
    run_until_idle(install)
    assert status(install, flaky) == "completed"
    assert event_types(install, flaky).count("step.retried") == 2
    assert status(install, broken) == "failed"
    assert query(install, "SELECT error_code, error_message FROM session_status WHERE session_id = :id", id=broken) == [
        ("STEP_FAILED", "step 0 (fail_n_times): planned failure 3 of 99")]
    assert query(install, "SELECT status, attempts FROM step_status WHERE session_id = :id", id=broken) == [("failed", 3)]
    retried = [e for e in install.store.stream("session", broken) if e.type == "step.retried"]
    assert [round(e.data["not_before"] - time.time() > -60) for e in retried] == [1, 1]


def test_two_runners_on_one_database_never_complete_a_step_twice(backend_install):
    install = backend_install
    ids = [submit(install, {"workflow": "tick3"}).target_id for _ in range(40)]
    workers = [runner(install, runner_id=f"runner-{n}") for n in range(2)]
    threads = [threading.Thread(target=w.run, kwargs={"until_idle": True}) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    counts = completions(install)
    assert len(counts) == 120 and set(counts.values()) == {1}
    assert {status(install, i) for i in ids} == {"completed"}
    assert all(w.steps_done > 0 for w in workers), [w.steps_done for w in workers]
    assert install.store.verify() == []


def _run_in_thread(install):
    worker = runner(install)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True})
    thread.start()
    return worker, thread


def _wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_cancel_interrupts_a_running_handler_quickly(backend_install):
    install = backend_install
    session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 100}}).target_id  # 10 s of sleep
    worker, thread = _run_in_thread(install)
    assert _wait_for(lambda: query(install, "SELECT status FROM step_status WHERE session_id = :id AND step_index = 1",
                                   id=session_id) == [("running",)])
    commands.control(install.store, session_id, "cancel")
    cancelled_at = time.monotonic()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 5
    assert status(install, session_id) == "cancelled"
    assert query(install, "SELECT status FROM step_status WHERE session_id = :id ORDER BY step_index", id=session_id) == [
        ("completed",), ("cancelled",), ("cancelled",)]
    worker.close()


def test_pause_mid_step_hands_the_step_back_and_resume_finishes_it(backend_install):
    install = backend_install
    session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 30}}).target_id
    worker, thread = _run_in_thread(install)
    assert _wait_for(lambda: query(install, "SELECT progress FROM session_status WHERE session_id = :id",
                                   id=session_id)[0][0] > 0.34)
    commands.control(install.store, session_id, "pause")
    thread.join(timeout=10)
    assert not thread.is_alive(), "a paused session is not work left to wait for"
    assert status(install, session_id) == "paused"
    assert query(install, "SELECT status, attempts FROM step_status WHERE session_id = :id AND step_index = 1",
                 id=session_id) == [("pending", 0)]
    assert "step.released" in event_types(install, session_id)
    commands.control(install.store, session_id, "resume")
    run_until_idle(install)
    assert status(install, session_id) == "completed"
    worker.close()


def test_progress_is_visible_in_the_view_while_a_step_runs(install):
    session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 30}}).target_id
    worker, thread = _run_in_thread(install)
    seen = set()
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        seen.add(round(query(install, "SELECT progress FROM session_status WHERE session_id = :id", id=session_id)[0][0], 2))
        time.sleep(0.05)
    thread.join()
    assert any(0.34 < value < 0.66 for value in seen), sorted(seen)
    worker.close()


def test_a_session_runs_its_steps_back_to_back_before_lower_priorities(backend_install):
    """The claim folded into a completion sees that completion: the same session's next step,
    not a lower-priority session's, runs next."""
    install = backend_install
    high = submit(install, {"workflow": "noop3", "priority": 9}).target_id
    low = submit(install, {"workflow": "noop3", "priority": 1}).target_id
    order = []
    run_until_idle(install, on_step=lambda claim, outcome: order.append((claim.session_id, claim.step_index)))
    assert order == [(high, 0), (high, 1), (high, 2), (low, 0), (low, 1), (low, 2)]


@pytest.mark.parametrize("wake", [0.02, 0.0], ids=["woken", "not-woken"])
def test_an_idle_runner_takes_a_new_job_when_it_is_submitted_not_at_its_next_look(backend_install, wake):
    """An idle runner that looks for work once a minute still takes a job submitted meanwhile at
    once: the event log's newest id, read every wake_poll_seconds, says something happened."""
    install = backend_install
    install.config.values["runner"].update(idle_poll_seconds=60.0, wake_poll_seconds=wake)
    worker = runner(install)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # its first look found nothing: it waits
        session = submit(install, {"workflow": "noop1"}).target_id
        deadline = time.monotonic() + (20 if wake else 3)
        while status(install, session) != "completed" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status(install, session) == ("completed" if wake else "pending")
    finally:
        worker.stop()
        thread.join(30)
        worker.close()
