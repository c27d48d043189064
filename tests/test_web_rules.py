"""The web page's rules, each alone: who may change things from where (the login cookie and
cross-site requests), where a login sends a browser back to, the form built from the schema,
the job file a session is submitted again as, a session's attempts folded from its events, the
queue in the order steps are claimed, thumbnails, and the runners' memory."""

from __future__ import annotations

import json
import os
import time

import pytest
from PIL import Image

from engine import queries
from engine.doors.web import auth, forms
from engine.face import reads
from engine.ingest.jobs import GenerationParams, job_schema, parse_job
from engine.outbox.thumbs import SIZE, make_thumbnail, thumbnail_path
from engine.run import fleet
from engine.run.claims import Policy
from tests.helpers import claim_one, runner, submit

HOST = "127.0.0.1:7860"


@pytest.fixture
def modelled(install, tiny_model):
    """An installation with the tiny model registered (what a txt2img job needs at submit)."""
    install.engine.models.add(tiny_model, "tiny")
    return install


@pytest.mark.parametrize(("method", "origin", "referer", "by_cookie", "refused"), [
    ("GET", "http://evil.example", None, True, False),  # reading is never refused for its origin
    ("POST", "http://127.0.0.1:7860", None, True, False),  # this site's own page
    ("POST", None, "http://127.0.0.1:7860/submit", True, False),  # no Origin, the Referer says it
    ("POST", "http://evil.example", None, True, True),
    ("DELETE", "http://127.0.0.1:7861", None, True, True),  # another port is another site
    ("POST", None, None, True, True),  # a cookie-borne change must say where it comes from
    ("POST", None, None, False, False),  # a program with its token in a header need not
    ("POST", "http://evil.example", None, False, True),  # a browser page of another site, even tokenless
    ("POST", "https://app.example", None, True, False),  # one of [server] cors_origins
    ("POST", "null", None, True, True),  # a sandboxed or file: page
])
def test_a_change_from_another_site_is_refused(method, origin, referer, by_cookie, refused):
    why = auth.cross_site(method, HOST, origin, referer, ["https://app.example/"], by_cookie)
    assert (why is not None) == refused, why


@pytest.mark.parametrize(("given", "kept"), [
    ("/sessions/ses-1?x=1", "/sessions/ses-1?x=1"), ("/", "/"), (None, "/"), ("", "/"),
    ("https://evil.example/", "/"), ("//evil.example/x", "/"), ("/\\evil.example", "/"), ("javascript:x", "/"),
])
def test_the_login_sends_a_browser_back_only_to_a_path_of_this_site(given, kept):
    assert auth.safe_next(given) == kept


def test_the_login_cookie_is_http_only_same_site_strict_and_carries_any_token():
    token = "a;b c=d,é"
    header = auth.set_cookie_header(token, secure=True)
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Secure" in header and "Path=/" in header
    value = header.split(";", 1)[0]
    assert auth.cookie_token(f"other=1; {value}; more=2") == token
    assert auth.cookie_token("other=1") is None
    assert "Max-Age=0" in auth.clear_cookie_header()


def test_pages_without_a_token_lead_to_the_login_and_api_paths_answer_401():
    assert auth.is_page("/") and auth.is_page("/sessions/x") and auth.is_page("/gallery")
    for path in ("/v1/jobs", "/sdapi/v1/txt2img", "/ui/queue", "/openapi.json", "/static/engine.js", "/login"):
        assert not auth.is_page(path), path
    assert auth.is_open("/static/engine.css") and auth.is_open("/healthz") and not auth.is_open("/ui/queue")


def test_the_form_has_one_field_per_param_typed_as_the_schema_says():
    schema = job_schema()
    groups = forms.param_groups(schema, ["tiny", "other"])
    names = [f.name for _, fields in groups for f in fields]
    assert sorted(names) == sorted(GenerationParams.model_fields), "every param once, none made up"
    by_name = {f.name: f for _, fields in groups for f in fields}
    assert by_name["prompt"].kind == "textarea"
    assert by_name["model"].kind == "select" and by_name["model"].options == ["tiny", "other"]
    assert by_name["scheduler"].kind == "select" and "dpm++2m_karras" in by_name["scheduler"].options
    assert by_name["width"].kind == "integer" and by_name["width"].step == 8 and by_name["width"].maximum == 16384
    assert by_name["guidance_scale"].kind == "number" and by_name["guidance_scale"].default == 7.0
    assert by_name["init_image"].kind == "image" and by_name["mask_image"].kind == "image"
    assert by_name["loras"].kind == "json" and by_name["postprocess"].kind == "json"
    assert [f.name for f in forms.job_fields(schema)] == ["priority", "job_id", "hold"]


def test_a_sessions_job_file_submits_the_same_params_again(modelled):
    job = {"workflow": "txt2img", "priority": 7, "params": {"prompt": "a lighthouse", "width": 64, "height": 64,
                                                            "steps": 3, "seed": 11, "num_images": 2}}
    first = submit(modelled, job)
    report = queries.session_report(modelled.store, modelled.engine.outbox, first.target_id)
    again = reads.job_file(modelled.engine, first.target_id)
    assert again["priority"] == 7 and again["params"]["seed"] == 11 and "negative_prompt" not in again["params"]
    second = submit(modelled, json.loads(json.dumps(again)))
    assert queries.session_report(modelled.store, modelled.engine.outbox, second.target_id)["params"] == report["params"]
    assert parse_job(again, modelled.intake.limits)


def test_a_sessions_attempts_are_folded_from_its_events():
    def event(kind, created, **data):
        return {"type": kind, "created_at": created, "data": data}

    found = queries.attempts([
        event("session.created", "t0", session_id="s"),
        event("step.claimed", "t1", run=1, step_index=0, attempt=1, runner_id="r1", worker="cuda:0", device="cuda:0"),
        event("step.retried", "t2", run=1, step_index=0, attempt=1, code="RUNNER_LOST", message="gone"),
        event("step.claimed", "t3", run=1, step_index=0, attempt=2, runner_id="r2", worker="cuda:1", device="cuda:1"),
        event("step.completed", "t4", run=1, step_index=0, attempt=2, duration_s=1.5,
              output={"data": {"call_id": "abc123", "call_images": 8, "call_sessions": 4}}),
        event("step.claimed", "t5", run=1, step_index=1, attempt=1, runner_id="r2", worker="cuda:1", device="cuda:1"),
    ])
    assert [(a["step_index"], a["attempt"], a["worker"], a["outcome"]) for a in found] == [
        (0, 1, "cuda:0", "retried"), (0, 2, "cuda:1", "completed"), (1, 1, "cuda:1", "running")]
    assert found[0]["error_code"] == "RUNNER_LOST" and found[0]["ended_at"] == "t2"
    assert (found[1]["call_id"], found[1]["call_images"], found[1]["call_sessions"], found[1]["duration_s"]) == \
        ("abc123", 8, 4, 1.5)


def test_the_queue_lists_pending_sessions_in_the_order_they_are_claimed(modelled):
    priorities = [1, 5, 9, 5, 9, 1, 0, 7]
    for number, priority in enumerate(priorities):
        submit(modelled, {"workflow": "txt2img", "job_id": f"q-{number}", "priority": priority,
                         "params": {"width": 64, "height": 64, "steps": 2}})
    submit(modelled, {"workflow": "txt2img", "job_id": "held", "hold": True, "params": {"width": 64, "height": 64}})
    fleet.register(modelled.store, "r-1", 30.0, "test", ["cpu"])
    shown = queries.queue(modelled.store)
    assert shown["counts"]["pending"] == len(priorities) and [s["job_id"] for s in shown["paused"]] == ["held"]
    assert [s["place"] for s in shown["pending"]] == list(range(1, len(priorities) + 1))
    assert all(s["waiting"].startswith("queued: #") for s in shown["pending"])
    claimed = []
    policy = Policy.from_config(modelled.config)
    while (claim := claim_one(modelled.store, "r-1", policy)) is not None:
        claimed.append(claim.session_id)
    assert [s["session_id"] for s in shown["pending"]] == claimed
    running = queries.queue(modelled.store)["running"]
    assert len(running) == len(priorities) and all(s["runner_id"] == "r-1" for s in running)


def test_with_fair_share_the_queue_lists_pending_sessions_in_the_owners_turns_the_claim_takes(modelled):
    from engine.run import claims

    for number in range(8):
        submit(modelled, {"workflow": "txt2img", "job_id": f"alice-{number}", "owner": "alice",
                          "params": {"width": 64, "height": 64, "steps": 2}})
    for number in range(3):
        submit(modelled, {"workflow": "txt2img", "job_id": f"bob-{number}", "owner": "bob",
                          "params": {"width": 64, "height": 64, "steps": 2}})
    submit(modelled, {"workflow": "txt2img", "job_id": "urgent", "owner": "bob", "priority": 9,
                      "params": {"width": 64, "height": 64, "steps": 2}})
    fleet.register(modelled.store, "r-1", 30.0, "test", ["cpu"])
    shown = queries.queue(modelled.store, owners={})
    order = [s["job_id"] for s in shown["pending"]]
    assert order[0] == "urgent" and order.index("bob-2") < 8, order  # by age alone: 12th, behind every alice
    assert all("owners' turns" in s["waiting"] for s in shown["pending"])
    policy, share = Policy.from_config(modelled.config), claims.FairShare({})
    batching = {**modelled.config.values["batching"], "coalesce": False}
    claimed = []
    while got := claims.claim_group(modelled.store, "r-1", policy, batching, share=share):
        claimed.append(got[0].session_id)
    assert [s["session_id"] for s in shown["pending"]] == claimed


def test_the_queue_says_why_a_session_waits_when_no_runner_can_take_it(modelled):
    fleet.register(modelled.store, "r-gpu", 30.0, "test", ["cuda:3"])  # a runner that had it, now stopped
    fleet.stopped(modelled.store, "r-gpu")
    submit(modelled, {"workflow": "txt2img", "params": {"width": 64, "height": 64, "device": "cuda:3"}})
    shown = queries.queue(modelled.store)
    assert shown["pending"][0]["waiting"].startswith("no runner is running")
    fleet.register(modelled.store, "r-1", 30.0, "test", ["cpu"])
    assert "pinned to device 'cuda:3'" in queries.queue(modelled.store)["pending"][0]["waiting"]


def test_a_thumbnail_is_small_and_made_again_when_its_png_changes(tmp_path):
    png = tmp_path / "00000-42.png"
    Image.new("RGB", (1024, 512), (10, 200, 30)).save(png)
    thumb = make_thumbnail(png)
    assert thumb == thumbnail_path(png) and thumb.name == "00000-42.thumb.webp"
    with Image.open(thumb) as image:
        assert image.format == "WEBP" and image.size == (SIZE, SIZE // 2)
    assert thumb.stat().st_size < png.stat().st_size
    made = thumb.stat().st_mtime_ns
    assert make_thumbnail(png).stat().st_mtime_ns == made, "an up-to-date thumbnail is kept"
    Image.new("RGB", (300, 600), (200, 10, 30)).save(png)
    later = time.time() + 5
    os.utime(png, (later, later))
    with Image.open(make_thumbnail(png)) as image:
        assert image.size == (SIZE // 2, SIZE)
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []


def test_each_heartbeat_records_the_workers_memory(install):
    worker = runner(install)
    try:
        memory = worker.memory()
        assert set(memory) == set(worker.devices)
        assert all(m["used"] > 0 and m["total"] >= m["used"] for m in memory.values())
        fleet.register(install.store, worker.runner_id, 30.0, "test", worker.devices)
        fleet.beat(install.store, worker.runner_id, 30.0, [], memory)
        listed = next(r for r in queries.runners(install.store) if r["runner_id"] == worker.runner_id)
        assert listed["memory"] == memory
    finally:
        worker.close()


def test_the_gallery_pages_through_every_image_once_whatever_the_page_size(install):
    """Sessions that finish together (a shared call) and pages that end on a session's last image
    included: every image exactly once, newest session first, each session's images in order."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.helpers import run_until_idle

    for n in range(8):
        submit(install, {"workflow": "noop1", "job_id": f"g-{n}", "params": {"prompt": f"p{n}"}})
    run_until_idle(install)
    done = queries.list_sessions(install.store, status="completed", limit=100)
    assert len(done) == 8

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=7), min_size=8, max_size=8),
           st.integers(min_value=1, max_value=20))
    def pages(counts, limit):
        for row, count in zip(done, counts):
            folder = install.engine.outbox.dir_of({**row, "run": 1, "batch_id": None, "item_index": None})
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "result.json").write_text(json.dumps({"images": [f"{i:05d}-{i}.png" for i in range(count)]}))
        seen, cursor = [], None
        for _ in range(100):
            page = queries.gallery(install.store, install.engine.outbox, limit, tuple(cursor) if cursor else None)
            assert len(page["images"]) <= limit
            seen += [(i["session_id"], i["number"]) for i in page["images"]]
            cursor = page["next"]
            if cursor is None:
                break
        expected = sorted(((r["session_id"], number) for r, c in zip(done, counts) for number in range(c)))
        assert sorted(seen) == expected and len(seen) == len(set(seen)), (counts, limit)
        whole = [(i["session_id"], i["number"]) for i in queries.gallery(install.store, install.engine.outbox,
                                                                         10000)["images"]]
        assert seen == whole, "pages, one after another, are the one long list"
        runs = [session for n, (session, _) in enumerate(seen) if n == 0 or seen[n - 1][0] != session]
        assert len(runs) == len(set(runs)), "each session's images together, in order"

    pages()
