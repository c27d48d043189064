"""Every allowed and refused control of the contract, on sessions and batches, on both backends."""

from __future__ import annotations

import pytest

from engine import commands
from engine.errors import InvalidTransition, NotFound
from engine.run.claims import Policy
from tests.helpers import claim_one, query, run_until_idle, status, submit

ALLOWED = {
    "pending": {"pause", "cancel", "delete"},
    "running": {"pause", "cancel"},
    "paused": {"resume", "cancel", "delete"},
    "completed": {"restart", "delete"},
    "failed": {"restart", "delete"},
    "cancelled": {"restart", "delete"},
}
ACTIONS = ("pause", "resume", "cancel", "restart", "delete")
RESULT = {"pause": "paused", "cancel": "cancelled", "restart": "pending", "resume": "running", "delete": None}


def session_in(install, state: str) -> str:
    workflow = "broken" if state == "failed" else "noop3"
    session_id = submit(install, {"workflow": workflow, "hold": state == "paused"}).target_id
    if state == "running":
        claim = claim_one(install.store, "runner-a", Policy.from_config(install.config))
        assert claim.session_id == session_id
    elif state in ("completed", "failed"):
        run_until_idle(install)
    elif state == "cancelled":
        commands.control(install.store, session_id, "cancel")
    assert status(install, session_id) == state
    return session_id


def event_count(install) -> int:
    return query(install, "SELECT count(*) FROM events")[0][0]


@pytest.mark.parametrize("state", list(ALLOWED))
@pytest.mark.parametrize("action", ACTIONS)
def test_every_session_control_is_allowed_or_refused_as_the_contract_says(backend_install, state, action):
    install = backend_install
    session_id = session_in(install, state)
    before = event_count(install)
    if action in ALLOWED[state]:
        commands.control(install.store, session_id, action)
        after = query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session_id)
        expected = RESULT[action]
        if action == "resume":  # a held session that never started goes back to pending
            expected = "pending"
        assert (after[0][0] if after else None) == expected
        assert event_count(install) > before
    else:
        with pytest.raises(InvalidTransition) as refused:
            commands.control(install.store, session_id, action)
        assert refused.value.code == "INVALID_TRANSITION"
        assert refused.value.extra["current_state"] == state
        assert event_count(install) == before, "a refused control wrote nothing"
        assert status(install, session_id) == state


def test_resuming_a_started_session_makes_it_running_again(install):
    session_id = session_in(install, "running")
    commands.control(install.store, session_id, "pause")
    commands.control(install.store, session_id, "resume")
    assert status(install, session_id) == "running"


def test_controls_find_sessions_by_job_id(install):
    session_id = submit(install, {"workflow": "noop3", "job_id": "client-key-1"}).target_id
    target_type, target_id, _ = commands.control(install.store, "client-key-1", "pause")
    assert (target_type, target_id) == ("session", session_id)


def test_a_control_for_an_unknown_target_is_not_found(install):
    with pytest.raises(NotFound):
        commands.control(install.store, "ses-nope", "cancel")


def test_restart_starts_a_new_run_and_keeps_the_old_runs_events(install):
    session_id = session_in(install, "completed")
    first_run_events = [e.type for e in install.store.stream("session", session_id)]
    commands.control(install.store, session_id, "restart")
    run_until_idle(install)
    events = install.store.stream("session", session_id)
    assert [e.type for e in events][: len(first_run_events)] == first_run_events
    assert [e.type for e in events].count("session.completed") == 2
    assert query(install, "SELECT run, status FROM sessions WHERE session_id = :id", id=session_id) == [(2, "completed")]


def test_delete_removes_the_status_rows_and_keeps_the_events(install):
    session_id = session_in(install, "completed")
    commands.control(install.store, session_id, "delete")
    assert query(install, "SELECT count(*) FROM session_status WHERE session_id = :id", id=session_id) == [(0,)]
    assert install.store.stream("session", session_id)[-1].type == "session.deleted"
    assert install.store.verify() == []


def test_batch_controls_reach_every_item(backend_install):
    install = backend_install
    batch = submit(install, {"kind": "batch", "workflow": "noop1", "items": [{}, {}, {}]})
    commands.control(install.store, batch.target_id, "pause")
    assert query(install, "SELECT DISTINCT status FROM sessions WHERE batch_id = :b", b=batch.target_id) == [("paused",)]
    with pytest.raises(InvalidTransition):
        commands.control(install.store, batch.target_id, "restart")
    commands.control(install.store, batch.target_id, "resume")
    run_until_idle(install)
    assert query(install, "SELECT status, completed_items, total_items FROM batch_status") == [("completed", 3, 3)]
    commands.control(install.store, batch.target_id, "restart")
    assert query(install, "SELECT status, completed_items FROM batch_status") == [("pending", 0)]
    run_until_idle(install)
    assert query(install, "SELECT status, completed_items FROM batch_status") == [("completed", 3)]
    assert install.store.verify() == []


def test_cancelling_a_batch_cancels_its_items_and_ends_it(install):
    batch = submit(install, {"kind": "batch", "workflow": "noop1", "items": [{}, {}]})
    commands.control(install.store, batch.target_id, "cancel")
    assert query(install, "SELECT status, cancelled_items FROM batches") == [("cancelled", 2)]
    assert query(install, "SELECT DISTINCT status FROM sessions") == [("cancelled",)]


def test_an_item_session_is_restarted_through_its_batch_only(install):
    batch = submit(install, {"kind": "batch", "workflow": "noop1", "items": [{}]})
    run_until_idle(install)
    item_session = query(install, "SELECT session_id FROM items")[0][0]
    with pytest.raises(InvalidTransition, match="restart the batch"):
        commands.control(install.store, item_session, "restart")
    assert batch.target_type == "batch"


def test_a_held_batch_whose_items_are_all_cancelled_one_by_one_ends(install):
    batch = submit(install, {"kind": "batch", "workflow": "noop1", "hold": True, "items": [{}, {}]})
    for (session_id,) in query(install, "SELECT session_id FROM items ORDER BY item_index"):
        commands.control(install.store, session_id, "cancel")
    assert query(install, "SELECT status, cancelled_items, total_items FROM batches") == [("completed", 2, 2)]
    assert batch.target_type == "batch"
    assert install.store.verify() == []
