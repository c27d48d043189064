"""Many users on one queue. Every job has an owner (a job file's field, an HTTP token's owner, the
stdio worker's client id; "default" else), shown in every report and the owner_status view. The
claim shares the queue's head priority between owners by weighted turns (engine.run.fairshare,
tested alone here with hypothesis); limits per owner refuse at submit with their codes and touch
nothing already accepted. Real runner processes, two at once, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import queries
from engine.errors import QuotaExceeded, RateLimited
from engine.ingest import quotas
from engine.run import fairshare
from tests.conftest import Installation
from tests.helpers import query, submit
from tests.served import Served
from tests.test_worker import Pipe

pytestmark = pytest.mark.slow
PAINT = {"workflow": "paint", "params": {"prompt": "x"}}
PAINTED = '%"step_index":1,%'  # a paint step's claim (the log's JSON: sorted keys, no spaces)


def _runners(install, count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet", "--runner-id", f"fair-{n}"],
                             env=install.env(), cwd=install.folder, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for n in range(count)]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _paint_claims(install) -> list[tuple[str, str]]:
    """(owner, session) of each paint step claimed, in the order of the log."""
    rows = query(install, "SELECT e.stream_id, s.owner FROM events e JOIN sessions s ON s.session_id = e.stream_id "
                          "WHERE e.type = 'step.claimed' AND e.data LIKE :paint ORDER BY e.event_id", paint=PAINTED)
    return [(owner, session) for session, owner in rows]


def _submit_many(install, owner: str, count: int, prefix: str) -> list[str]:
    return [submit(install, {**PAINT, "owner": owner, "job_id": f"{prefix}-{n}"}).target_id for n in range(count)]


def _until(install, count_sql: str, at_least: int, deadline: float) -> None:
    """Wait until the count the query gives reaches `at_least` (failing past `deadline`)."""
    while query(install, count_sql)[0][0] < at_least:
        assert time.monotonic() < deadline, f"{count_sql}: fewer than {at_least} in time"
        time.sleep(0.05)


def test_a_small_owner_is_served_at_once_behind_a_big_ones_queue(tmp_path, database_url):
    install = Installation(tmp_path / "engine", database_url=database_url)
    _submit_many(install, "alice", 500, "a")
    runners = _runners(install, 2)
    try:
        deadline = time.monotonic() + 120
        _until(install, "SELECT count(*) FROM sessions WHERE owner = 'alice' AND status = 'completed'", 10, deadline)
        bobs = _submit_many(install, "bob", 5, "b")
        _until(install, "SELECT count(*) FROM sessions WHERE owner = 'bob' AND status = 'completed'", 5, deadline)
    finally:
        _stop(runners)
    claims = _paint_claims(install)
    first_bob = next(n for n, (owner, _) in enumerate(claims) if owner == "bob")
    # Bob's first paint step was ready once his first noop step ran; from then on at most one call
    # per runner went to alice before his.
    ready_at = query(install, "SELECT min(e.event_id) FROM events e WHERE e.type = 'step.completed' AND "
                              "e.stream_id IN (" + ", ".join(f"'{b}'" for b in bobs) + ")")[0][0]
    alice_between = query(install, "SELECT count(*) FROM events e JOIN sessions s ON s.session_id = e.stream_id "
                                   "WHERE e.type = 'step.claimed' AND e.data LIKE :paint AND "
                                   "s.owner = 'alice' AND e.event_id > :ready AND e.event_id < (SELECT min(event_id) "
                                   "FROM events e2 JOIN sessions s2 ON s2.session_id = e2.stream_id WHERE "
                                   "e2.type = 'step.claimed' AND e2.data LIKE :paint AND "
                                   "s2.owner = 'bob')", ready=ready_at, paint=PAINTED)[0][0]
    assert alice_between <= 2, f"{alice_between} of alice's calls went first (two runners: at most one each)"
    done = query(install, "SELECT s.owner FROM events e JOIN sessions s ON s.session_id = e.stream_id "
                          "WHERE e.type = 'session.completed' ORDER BY e.event_id")
    last_bob = max(n for n, (owner,) in enumerate(done) if owner == "bob")
    alice_before = sum(1 for owner, in done[:last_bob] if owner == "alice")
    assert alice_before < 50, f"bob's five finished after alice's {alice_before}th"
    assert first_bob > 0 and install.store.verify() == []


def test_weights_three_to_one_split_the_images_three_to_one(tmp_path, database_url):
    install = Installation(tmp_path / "engine", database_url=database_url,
                           settings={"owners": {"alice": {"weight": 3}, "bob": {"weight": 1}}})
    _submit_many(install, "alice", 300, "a")
    _submit_many(install, "bob", 300, "b")
    runners = _runners(install, 2)
    try:
        _until(install, "SELECT count(*) FROM steps WHERE step_index = 1 AND status = 'completed'", 200,
               time.monotonic() + 180)
    finally:
        _stop(runners)
    first = [owner for owner, _ in _paint_claims(install)][:200]
    alice = first.count("alice")
    assert 135 <= alice <= 165, f"alice made {alice} of the first 200 images (3:1 is 150)"


def test_an_owners_max_running_holds_its_new_sessions_not_the_others(tmp_path):
    install = Installation(tmp_path / "engine", settings={"owners": {"alice": {"max_running": 1}}})
    _submit_many(install, "alice", 6, "a")
    _submit_many(install, "bob", 6, "b")
    runners = _runners(install, 2)
    try:
        seen_running = 0
        deadline = time.monotonic() + 120
        while query(install, "SELECT count(*) FROM sessions WHERE status = 'completed'")[0][0] < 12:
            running = query(install, "SELECT count(*) FROM sessions WHERE owner = 'alice' AND status = 'running'")
            seen_running = max(seen_running, running[0][0])
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        _stop(runners)
    assert seen_running == 1


def test_quotas_and_rates_refuse_with_their_codes_and_touch_nothing_accepted(tmp_path):
    install = Installation(tmp_path / "engine", settings={"owners": {"alice": {"max_pending": 3}, "*": {"rate": 4}}})
    kept = [submit(install, {**PAINT, "owner": "alice", "job_id": f"a-{n}"}).target_id for n in range(3)]
    with pytest.raises(QuotaExceeded) as refused:
        submit(install, {**PAINT, "owner": "alice", "job_id": "a-3"})
    assert refused.value.code == "QUOTA_EXCEEDED"
    with pytest.raises(QuotaExceeded):
        submit(install, {"kind": "batch", "workflow": "paint", "owner": "alice", "items": [{}, {}]})
    for n in range(4):
        submit(install, {**PAINT, "owner": "carol", "job_id": f"c-{n}"})
    with pytest.raises(RateLimited) as limited:
        submit(install, {**PAINT, "owner": "carol", "job_id": "c-4"})
    assert limited.value.code == "RATE_LIMITED" and 1 <= limited.value.retry_after <= 60
    assert [r["status"] for r in (queries.session_report(install.store, install.engine.outbox, s) for s in kept)] == \
        ["pending"] * 3
    assert query(install, "SELECT count(*) FROM sessions") == [(7,)]
    # Through the inbox: the refusal lands in rejected/ with its code, like any other.
    (install.config.inbox / "over.json").write_text(json.dumps({**PAINT, "owner": "alice"}))
    from tests.helpers import run_until_idle

    install.engine.inbox().scan()
    error = json.loads((install.config.inbox / "rejected" / "over.json.error.json").read_text())
    assert error["code"] == "QUOTA_EXCEEDED"
    run_until_idle(install)
    assert query(install, "SELECT count(*) FROM sessions WHERE owner = 'alice' AND status = 'completed'") == [(3,)]


def test_over_http_the_token_says_the_owner_and_a_rate_is_a_429_with_retry_after(tmp_path):
    install = Installation(tmp_path / "engine", settings={
        "server": {"tokens": {"tok-alice": "alice", "tok-bob": "bob"}}, "owners": {"bob": {"rate": 2}}})
    server = Served(install, "--no-runner")
    try:
        alice = {"Authorization": "Bearer tok-alice"}
        made = httpx.post(f"{server.url}/v1/jobs", json=PAINT, headers=alice)
        assert made.status_code == 201, made.text
        report = httpx.get(f"{server.url}/v1/sessions/{made.json()['session_id']}", headers=alice).json()
        assert report["owner"] == "alice"
        posing = httpx.post(f"{server.url}/v1/jobs", json={**PAINT, "owner": "bob"}, headers=alice)
        assert posing.status_code == 403 and posing.json()["code"] == "FORBIDDEN"
        bob = {"Authorization": "Bearer tok-bob"}
        assert [httpx.post(f"{server.url}/v1/jobs", json=PAINT, headers=bob).status_code for _ in range(2)] == [201] * 2
        limited = httpx.post(f"{server.url}/v1/jobs", json=PAINT, headers=bob)
        assert limited.status_code == 429 and limited.json()["code"] == "RATE_LIMITED"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        listed = httpx.get(f"{server.url}/v1/sessions", headers=bob).json()["sessions"]
        assert sorted(s["owner"] for s in listed) == ["alice", "bob", "bob"]
    finally:
        server.stop()
        install.engine.close()
    rows = {r[0]: r[1:] for r in query(install, "SELECT owner, running, pending FROM owner_status")}
    assert rows == {"alice": (0, 1), "bob": (0, 2)}


def test_the_stdio_workers_client_id_is_its_owner(install):
    pipe = Pipe(install, "--client-id", "orchestrator-7", "--no-runner")
    try:
        made = pipe.call("execute_workflow", workflow_id="noop1", parameters={"prompt": "x"})
        mine = pipe.call("execute_workflow", workflow_id="noop1", parameters={"prompt": "y"}, owner="someone")
    finally:
        pipe.close()
    owners = dict(query(install, "SELECT session_id, owner FROM sessions"))
    assert owners == {made["session_id"]: "orchestrator-7", mine["session_id"]: "someone"}


def test_owner_status_counts_images_and_gpu_seconds_of_today(tmp_path, tiny_model):
    install = Installation(tmp_path / "engine")
    install.engine.models.add(tiny_model, "tiny")
    submit(install, {"workflow": "txt2img", "owner": "alice", "params": {"width": 64, "height": 64, "steps": 2,
                                                                         "num_images": 3}})
    submit(install, {"workflow": "txt2img", "owner": "bob", "hold": True, "params": {"width": 64, "height": 64}})
    from tests.helpers import run_until_idle

    run_until_idle(install)
    rows = {r["owner"]: r for r in queries.owner_status(install.store)}
    assert rows["alice"]["images_today"] == 3 and rows["alice"]["gpu_seconds_today"] > 0
    assert rows["alice"]["running"] == 0 and rows["alice"]["pending"] == 0
    assert rows["bob"]["pending"] == 1 and rows["bob"]["images_today"] == 0


# the rules, alone ------------------------------------------------------------------------------

def _simulate(weights: dict[str, float], picks: int, costs: dict[str, float] | None = None) -> dict[str, int]:
    finish: dict[str, float] = {}
    clock = 0.0
    made = {owner: 0 for owner in weights}
    for _ in range(picks):
        chosen = fairshare.order(list(weights), finish, clock)[0]
        updated, clock = fairshare.charge(finish, clock, {chosen: (costs or {}).get(chosen, 1.0)}, weights, chosen)
        finish.update(updated)
        made[chosen] += 1
    return made


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=8), min_size=2, max_size=5))
def test_owners_that_all_wait_get_images_in_proportion_to_their_weights(weights):
    owners = {f"o{n}": float(w) for n, w in enumerate(weights)}
    picks = 40 * sum(weights)
    made = _simulate(owners, picks)
    for owner, weight in owners.items():
        share = picks * weight / sum(owners.values())
        assert abs(made[owner] - share) <= max(1.0, 0.02 * share), (made, owners)


def test_an_owner_back_from_idle_has_no_credit_saved_up():
    finish: dict[str, float] = {}
    clock = 0.0
    for _ in range(100):  # alice alone for a hundred images
        updated, clock = fairshare.charge(finish, clock, {"alice": 1.0}, {"alice": 1.0}, "alice")
        finish.update(updated)
    turns = []
    for _ in range(10):  # bob arrives: they alternate at once, bob does not get 100 in a row
        chosen = fairshare.order(["alice", "bob"], finish, clock)[0]
        updated, clock = fairshare.charge(finish, clock, {chosen: 1.0}, {"alice": 1.0, "bob": 1.0}, chosen)
        finish.update(updated)
        turns.append(chosen)
    assert turns.count("bob") == 5 and turns[0] == "bob"


def test_the_claim_order_takes_priority_first_then_turns_and_keeps_each_owners_own_order():
    queued = [("alice", 5, 1.0)] * 6 + [("bob", 5, 1.0)] * 2 + [("carol", 9, 4.0)] + [("bob", 1, 1.0)]
    taken = fairshare.claim_order(queued, {}, 0.0, {"alice": 1.0, "bob": 1.0, "carol": 1.0}, first=len(queued))
    assert sorted(taken) == list(range(len(queued))), "each once"
    assert taken[0] == 8, "the higher priority first, whoever owns it"
    assert taken[1:5] == [0, 6, 1, 7] and taken[5:9] == [2, 3, 4, 5] and taken[9] == 9
    heavy = fairshare.claim_order([("a", 5, 1.0)] * 30 + [("b", 5, 1.0)] * 30, {}, 0.0, {"a": 3.0, "b": 1.0}, first=20)
    assert len(heavy) == 20 and sum(1 for i in heavy if i < 30) == 15, "weights 3:1 take turns 3:1"


def test_a_step_that_makes_no_image_still_costs_a_little():
    assert fairshare.cost_of(0) == fairshare.STEP_COST > 0 and fairshare.cost_of(4) == 4.0


def test_the_submit_limits_alone():
    limits = fairshare.Limits(max_pending=3, rate=2)
    quotas.check_pending("a", 2, 1, limits)
    with pytest.raises(QuotaExceeded):
        quotas.check_pending("a", 2, 2, limits)
    quotas.check_rate("a", [100.0], 130.0, limits)
    with pytest.raises(RateLimited) as limited:
        quotas.check_rate("a", [100.0, 120.0], 130.0, limits)
    assert limited.value.retry_after == 30  # the oldest leaves the minute at 160
    quotas.check_rate("a", [60.0, 120.0], 130.0, limits)  # 60 is out of the window
    assert fairshare.limits_of({"*": {"rate": 9}}, "zed").rate == 9
    assert fairshare.limits_of({"zed": {"weight": 2}, "*": {"rate": 9}}, "zed") == fairshare.Limits(weight=2.0)
