"""Reordering: a control action `priority` with a new value, through every door (a job file, the
CLI, the stdio worker, HTTP). The next claim sees it at once; a running step is not touched; a
batch gives it to every item not yet ended; an ended target refuses it; the log rebuilds it."""

from __future__ import annotations

import json

import httpx
import pytest

from engine import commands, queries
from engine.errors import InvalidTransition, ValidationError
from engine.run.claims import Policy
from tests.conftest import Installation
from tests.helpers import claim_one, engine_process, query, submit
from tests.served import Served
from tests.test_worker import Pipe

NOOP = {"workflow": "noop1", "params": {"prompt": "x"}}


def _sessions(install, count: int, prefix: str, priority: int = 5) -> list[str]:
    return [submit(install, {**NOOP, "job_id": f"{prefix}-{n}", "priority": priority}).target_id for n in range(count)]


def _next_claimed(install) -> str:
    claim = claim_one(install.store, "r-1", Policy.from_config(install.config))
    assert claim is not None
    return claim.session_id


@pytest.mark.parametrize("door", ["job file", "cli", "stdio"])
def test_a_new_priority_moves_a_pending_session_ahead_of_older_ones_at_once(install, door):
    older = _sessions(install, 3, "old")
    newest = submit(install, {**NOOP, "job_id": "newest"}).target_id
    if door == "job file":
        done = submit(install, {"kind": "control", "target": "newest", "action": "priority", "priority": 90})
        assert done.target_type == "control" and done.target_id == newest
    elif door == "cli":
        said = json.loads(engine_process(install, "priority", "newest", "90", "--json"))
        assert said["events"] == ["session.reprioritized"] and said["priority"] == 90
    else:
        pipe = Pipe(install, "--no-runner")  # its own runner would claim the newest at once
        try:
            answer = pipe.call("control_session", session_id="newest", action="priority", priority=90)
            assert answer["events"] == ["session.reprioritized"]
        finally:
            pipe.close()
    assert query(install, "SELECT priority FROM sessions WHERE session_id = :id", id=newest) == [(90,)]
    assert queries.session_report(install.store, install.engine.outbox, newest)["priority"] == 90
    assert queries.queue(install.store)["pending"][0]["session_id"] == newest
    assert _next_claimed(install) == newest
    assert [_next_claimed(install) for _ in older] == older, "the others keep their order"
    assert install.store.verify() == []


def test_a_running_session_is_not_touched_and_an_ended_one_refuses(install):
    first, second = _sessions(install, 2, "s")
    claim = claim_one(install.store, "r-1", Policy.from_config(install.config))
    assert claim.session_id == first
    lease = query(install, "SELECT runner_id, attempt, expires_at FROM leases WHERE session_id = :id", id=first)
    commands.control(install.store, first, "priority", 0)
    assert query(install, "SELECT status FROM sessions WHERE session_id = :id", id=first) == [("running",)]
    assert query(install, "SELECT runner_id, attempt, expires_at FROM leases WHERE session_id = :id", id=first) == lease
    assert query(install, "SELECT status FROM steps WHERE session_id = :id AND step_index = 0", id=first) == \
        [("running",)]
    commands.control(install.store, second, "cancel")
    with pytest.raises(InvalidTransition):
        commands.control(install.store, second, "priority", 50)
    with pytest.raises(ValidationError):
        commands.control(install.store, first, "priority", 1001)
    with pytest.raises(ValidationError):
        submit(install, {"kind": "control", "target": first, "action": "priority"})
    with pytest.raises(ValidationError):
        submit(install, {"kind": "control", "target": first, "action": "pause", "priority": 3})
    assert install.store.verify() == []


def test_a_batch_gives_its_new_priority_to_every_item_not_yet_ended(install):
    batch = submit(install, {"kind": "batch", "workflow": "noop1", "params": {"prompt": "b"},
                             "items": [{"prompt": f"i{n}"} for n in range(4)]}).target_id
    items = [i["session_id"] for i in queries.batch_report(install.store, batch)["items"]]
    commands.control(install.store, items[0], "cancel")
    lone = submit(install, {**NOOP, "job_id": "lone", "priority": 50}).target_id
    _, _, appended = commands.control(install.store, batch, "priority", 80)
    assert [e.type for e in appended] == ["batch.reprioritized"] + ["session.reprioritized"] * 3
    assert dict(query(install, "SELECT session_id, priority FROM sessions WHERE batch_id = :b", b=batch)) == \
        {items[0]: 5, items[1]: 80, items[2]: 80, items[3]: 80}
    assert queries.batch_report(install.store, batch)["priority"] == 80
    assert _next_claimed(install) == items[1] and lone != items[1]
    assert install.store.verify() == []


def test_over_http_a_priority_is_a_post_with_its_value(tmp_path):
    install = Installation(tmp_path / "engine")
    server = Served(install, "--no-runner")
    try:
        ids = [httpx.post(f"{server.url}/v1/jobs", json={**NOOP, "job_id": f"h-{n}"}).json()["session_id"]
               for n in range(3)]
        moved = httpx.post(f"{server.url}/v1/sessions/h-2/priority", json={"priority": 70})
        assert moved.status_code == 200 and moved.json()["events"] == ["session.reprioritized"]
        listed = httpx.get(f"{server.url}/v1/sessions/{ids[2]}").json()
        assert listed["priority"] == 70
        bad = httpx.post(f"{server.url}/v1/sessions/h-1/priority", json={"priority": -1})
        assert bad.status_code == 422 and bad.json()["code"] == "VALIDATION_ERROR"
        missing = httpx.post(f"{server.url}/v1/sessions/h-1/priority", json={})
        assert missing.status_code == 422
        assert httpx.post(f"{server.url}/v1/sessions/nope/priority", json={"priority": 1}).status_code == 404
        by_file = httpx.post(f"{server.url}/v1/jobs", json={"kind": "control", "target": "h-0", "action": "priority",
                                                            "priority": 99})
        assert by_file.status_code == 200
        assert httpx.get(f"{server.url}/v1/sessions/{ids[0]}").json()["priority"] == 99
    finally:
        server.stop()
        install.engine.close()
