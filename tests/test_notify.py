"""Webhooks that are never lost: a real receiver on 127.0.0.1 and real runner processes. Every
event asked for is delivered, at least once and under one webhook-id however many attempts it
took (500s, a stall past the timeout); a runner SIGKILLed between the commit and the send
delivers after its restart; a dead receiver's delivery ends dead, visible in SQL and `engine
notify list`, and `engine notify retry` delivers it once the receiver is back. Signatures are
verified with the `standardwebhooks` library; the rules are tested alone."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from engine.errors import ValidationError
from engine.notify import rules
from tests.conftest import Installation
from tests.helpers import engine_process, query, submit
from tests.receiver import Receiver
from tests.served import Served, free_port

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FAST = {"secret": SECRET, "allow_private": True, "timeout_seconds": 1.0, "backoff_base_seconds": 0.05,
        "backoff_max_seconds": 0.2, "poll_seconds": 0.05, "max_attempts": 8}


def _install(tmp_path, **notify) -> Installation:
    return Installation(tmp_path / "engine", settings={"notify": {**FAST, **notify}})


def _runner(install, *options: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet", *options],
                            env={**install.env(), **(env or {})}, cwd=install.folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def _wait(predicate, seconds: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _statuses(install) -> dict[str, str]:
    return dict(query(install, "SELECT id, status FROM webhook_deliveries"))


def _job(url: str, n: int, events=("session.completed",)) -> dict:
    return {"workflow": "noop1", "job_id": f"hooked-{n}", "params": {"prompt": f"p{n}"},
            "notify": {"url": url, "events": list(events)}}


def test_every_event_is_delivered_once_per_webhook_id_through_500s_and_a_stall(tmp_path):
    receiver = Receiver(["500", "500", "500", "stall"], stall_seconds=2.5)
    install = _install(tmp_path)
    runner = _runner(install)
    try:
        sessions = [submit(install, _job(receiver.url, n, ("session.started", "session.completed"))).target_id
                    for n in range(3)]
        _wait(lambda: len(_statuses(install)) == 6 and set(_statuses(install).values()) == {"delivered"}, 90,
              "every delivery delivered")
    finally:
        _stop(runner)
        receiver.close()
    deliveries = {r[0]: r for r in query(install, "SELECT id, event, target_id, attempts, last_status "
                                                   "FROM webhook_deliveries")}
    # Every request carries a webhook-id of a recorded delivery, and a signature that verifies.
    verifier = Webhook(SECRET)
    for request in receiver.requests:
        assert request["headers"]["webhook-id"] in deliveries
        assert verifier.verify(request["body"], request["headers"])["data"]["event_type"] in (
            "session.started", "session.completed")
    # A receiver that drops repeats by webhook-id counts each event once: six events, six ids.
    assert len(set(receiver.ids())) == 6 and len(receiver.requests) == 6 + 4, receiver.ids()
    by_event = {(row[1], row[2]) for row in deliveries.values()}
    assert by_event == {(e, s) for s in sessions for e in ("session.started", "session.completed")}
    # The attempts recorded are the requests the receiver saw, id by id.
    for delivery_id, row in deliveries.items():
        assert row[3] == receiver.ids().count(delivery_id) and row[4] == 200
    body = next(b for b in receiver.bodies() if b["type"] == "session.completed")
    assert body["data"]["session"]["status"] == "completed" and body["data"]["session"]["session_id"] in sessions
    assert install.store.verify() == []


def test_a_runner_killed_after_the_commit_and_before_the_send_delivers_after_its_restart(tmp_path):
    receiver = Receiver()
    install = _install(tmp_path, poll_seconds=30.0)  # the first runner would look only after 30 s
    first = _runner(install, "--runner-id", "r-1")
    try:
        session = submit(install, _job(receiver.url, 1)).target_id
        _wait(lambda: query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session) ==
              [("completed",)], 60)
        assert list(_statuses(install).values()) == ["pending"], "recorded with the event's commit"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert receiver.requests == [], "killed before it sent"
        second = _runner(install, "--runner-id", "r-1", env={"ENGINE_NOTIFY_POLL_SECONDS": "0.05"})
        try:
            _wait(lambda: list(_statuses(install).values()) == ["delivered"], 60, "delivered after the restart")
        finally:
            _stop(second)
    finally:
        if first.poll() is None:
            first.kill()
        receiver.close()
    assert len(receiver.requests) == 1
    assert Webhook(SECRET).verify(receiver.requests[0]["body"], receiver.requests[0]["headers"])["data"]["target_id"] \
        == session


def test_a_dead_receiver_ends_dead_and_a_retry_delivers_once_it_is_back(tmp_path):
    port = free_port()
    install = _install(tmp_path, max_attempts=3)
    runner = _runner(install)
    receiver = None
    try:
        submit(install, _job(f"http://127.0.0.1:{port}/hook", 1))
        _wait(lambda: list(_statuses(install).values()) == ["dead"], 60, "dead after its attempts")
        listed = json.loads(engine_process(install, "notify", "list", "--status", "dead", "--json"))
        assert len(listed) == 1 and listed[0]["attempts"] == 3 and listed[0]["event"] == "session.completed"
        assert "ConnectError" in listed[0]["last_error"] and listed[0]["next_attempt"] is None
        receiver = Receiver(port=port)
        said = json.loads(engine_process(install, "notify", "retry", listed[0]["id"], "--json"))
        assert said["events"] == ["delivery.retried"]
        _wait(lambda: list(_statuses(install).values()) == ["delivered"], 60, "delivered after the retry")
        assert receiver.ids() == [listed[0]["id"]]
    finally:
        _stop(runner)
        if receiver:
            receiver.close()
    assert query(install, "SELECT attempts FROM webhook_deliveries") == [(4,)]


def test_redirects_are_not_followed_and_one_kib_of_an_answer_is_kept(tmp_path):
    receiver = Receiver(["redirect"], answer=b"x" * 5000)
    install = _install(tmp_path, max_attempts=1)
    runner = _runner(install)
    try:
        submit(install, _job(receiver.url, 1))
        submit(install, _job(receiver.url, 2))
        _wait(lambda: sorted(_statuses(install).values()) == ["dead", "delivered"], 60)
    finally:
        _stop(runner)
        receiver.close()
    assert [r["path"] for r in receiver.requests] == ["/hook", "/hook"], "a redirect was followed"
    assert query(install, "SELECT last_status FROM webhook_deliveries WHERE status = 'dead'") == [(302,)]
    answers = [json.loads(d)["answer"] for (d,) in query(install, "SELECT data FROM events WHERE type = "
                                                                  "'delivery.attempted'")]
    assert sorted(len(a) for a in answers) == [0, 1024], "the redirect's empty body; 1 KiB of the 5,000 bytes"


def test_private_addresses_are_refused_unless_allowed(tmp_path):
    install = _install(tmp_path, allow_private=False, max_attempts=5)
    with pytest.raises(ValidationError, match="loopback"):
        submit(install, _job("http://127.0.0.1:9/hook", 1))
    with pytest.raises(ValidationError, match="private"):
        submit(install, _job("http://10.1.2.3/hook", 2))
    submit(install, _job("http://localhost:9/hook", 3))  # a name: checked when it is sent
    runner = _runner(install)
    try:
        _wait(lambda: list(_statuses(install).values()) == ["dead"], 60)
    finally:
        _stop(runner)
    (error, attempts), = query(install, "SELECT last_error, attempts FROM webhook_deliveries")
    assert error.startswith("refused:") and "loopback" in error and attempts == 1


def test_a_webhook_needs_the_signing_secret(tmp_path):
    install = _install(tmp_path, secret="")
    with pytest.raises(ValidationError, match=r"\[notify\] secret"):
        submit(install, _job("http://example.com/hook", 1))


def test_a_default_receiver_hears_every_job_that_names_none_and_a_batch_reports_its_own_events(tmp_path):
    receiver = Receiver()
    install = _install(tmp_path, url=receiver.url, events=["session.completed", "batch.completed", "item.completed"])
    runner = _runner(install)
    try:
        lone = submit(install, {"workflow": "noop1", "params": {"prompt": "lone"}}).target_id
        batch = submit(install, {"kind": "batch", "workflow": "noop1", "params": {"prompt": "b"},
                                 "items": [{"prompt": "i0"}, {"prompt": "i1"}]}).target_id
        _wait(lambda: len(_statuses(install)) == 4 and set(_statuses(install).values()) == {"delivered"}, 60)
    finally:
        _stop(runner)
        receiver.close()
    got = sorted((b["type"], b["data"]["target_id"]) for b in receiver.bodies())
    assert got == sorted([("session.completed", lone), ("batch.completed", batch), ("item.completed", batch),
                          ("item.completed", batch)]), "item sessions are reported by their batch"
    report = next(b for b in receiver.bodies() if b["type"] == "batch.completed")["data"]["batch"]
    assert report["status"] == "completed" and len(report["items"]) == 2


def test_through_engine_serve_the_body_links_the_images(tmp_path, tiny_model):
    receiver = Receiver()
    install = _install(tmp_path)
    install.engine.models.add(tiny_model, "tiny")
    server = Served(install)
    try:
        answer = httpx.post(f"{server.url}/v1/jobs", json={
            "workflow": "txt2img", "params": {"prompt": "hooked", "width": 64, "height": 64, "steps": 2},
            "notify": {"url": receiver.url}})
        assert answer.status_code == 201, answer.text
        _wait(lambda: list(_statuses(install).values()) == ["delivered"], 120)
        body = receiver.bodies()[0]
        links = body["data"]["session"]["image_urls"]
        assert len(links) == 1 and links[0].startswith(server.url)
        assert httpx.get(links[0]).headers["content-type"] == "image/png"
    finally:
        server.stop()
        install.engine.close()
        receiver.close()


# the rules, alone ------------------------------------------------------------------------------

POLICY = rules.Policy(max_attempts=5, max_age_seconds=3600, backoff_base=2.0, backoff_max=60.0)


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_backoff_grows_doubling_to_its_ceiling_with_jitter_on_the_upper_half(attempt, seed):
    waited = rules.backoff(attempt, POLICY, random.Random(seed))
    ceiling = min(60.0, 2.0 * 2 ** (attempt - 1))
    assert ceiling / 2 <= waited <= ceiling


def test_a_delivery_is_dead_after_its_attempts_or_its_age():
    assert not rules.is_dead(4, 10, POLICY) and rules.is_dead(5, 10, POLICY) and rules.is_dead(0, 3600, POLICY)


@pytest.mark.parametrize(("address", "allowed", "refused"), [
    ("93.184.216.34", False, False), ("127.0.0.1", False, True), ("127.0.0.1", True, False),
    ("10.0.0.8", False, True), ("192.168.1.2", False, True), ("172.16.5.4", False, True),
    ("169.254.169.254", False, True), ("::1", False, True), ("fe80::1", False, True), ("fd00::1", False, True),
    ("::ffff:127.0.0.1", False, True), ("0.0.0.0", True, True), ("224.0.0.1", True, True),
    ("2606:4700:4700::1111", False, False), ("100.64.0.1", False, True), ("::1", True, False),
])
def test_which_addresses_a_delivery_may_not_go_to(address, allowed, refused):
    assert (rules.address_refused(address, allowed) is not None) == refused


def test_a_loopback_address_is_refused_as_loopback_whichever_ip_version():
    assert "loopback" in rules.address_refused("::1", False) and "loopback" in rules.address_refused("127.0.0.1", False)


def test_a_jobs_own_notify_wins_over_the_default_and_names_its_events():
    default = {"url": "https://all.example/hook", "events": ["session.completed"]}
    own = {"url": "https://mine.example/hook", "events": ["session.failed"]}
    assert rules.wanted("session.completed", None, default) == "https://all.example/hook"
    assert rules.wanted("session.failed", None, default) is None
    assert rules.wanted("session.failed", own, default) == "https://mine.example/hook"
    assert rules.wanted("session.completed", own, default) is None
    assert rules.wanted("session.completed", None, None) is None
