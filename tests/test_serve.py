"""`engine serve`: a real uvicorn process, driven by httpx, the official `openai` client and
`webuiapi` (AUTOMATIC1111's), on a tiny diffusers model built in code. An answered submission is a
committed job; a retried request never makes a second one; every bad request gets its code."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import Installation
from tests.served import Served
from tests.helpers import engine_process, query

pytestmark = pytest.mark.slow


@pytest.fixture
def served(tmp_path, tiny_model):
    install = Installation(tmp_path / "engine", settings={"server": {"max_body_bytes": 2_000_000}})
    install.engine.models.add(tiny_model, "tiny")
    server = Served(install)
    yield server
    server.stop()
    install.engine.close()


def _wait_ended(url: str, session_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = httpx.get(f"{url}/v1/sessions/{session_id}").json()
        # ended, and its result.json written (after the commit, in the background): its images are listed
        if report["status"] in ("completed", "failed", "cancelled") and (Path(report["outbox"]) / "result.json").exists():
            return httpx.get(f"{url}/v1/sessions/{session_id}").json()
        assert time.monotonic() < deadline, report
        time.sleep(0.1)


def test_a_posted_job_is_committed_when_answered_and_a_repeat_of_its_key_is_the_same_job(served):
    job = {"workflow": "txt2img", "params": {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}}
    first = httpx.post(f"{served.url}/v1/jobs", json=job, headers={"Idempotency-Key": "key-1"})
    assert first.status_code == 201, first.text
    session_id = first.json()["session_id"]
    # Answered means committed: the row is there for any other reader at once.
    assert query(served.install, "SELECT job_id FROM sessions WHERE session_id = :id", id=session_id) == [("key-1",)]
    again = httpx.post(f"{served.url}/v1/jobs", json=job, headers={"Idempotency-Key": "key-1"})
    assert again.status_code == 200 and again.json()["session_id"] == session_id and again.json()["already_submitted"]
    report = _wait_ended(served.url, session_id)
    assert report["status"] == "completed" and len(report["images"]) == 1
    cli = json.loads(engine_process(served.install, "session", session_id, "--json"))
    assert {k: v for k, v in report.items() if k != "activity"} == {k: v for k, v in cli.items() if k != "activity"}
    png = httpx.get(f"{served.url}/v1/sessions/{session_id}/images/0")
    assert png.headers["content-type"] == "image/png"
    assert "a lighthouse" in Image.open(io.BytesIO(png.content)).info["parameters"]
    listed = httpx.get(f"{served.url}/v1/sessions", params={"job_id": "key-1"}).json()["sessions"]
    assert [s["session_id"] for s in listed] == [session_id]
    assert query(served.install, "SELECT count(*) FROM sessions") == [(1,)]


def test_bad_requests_get_the_contracts_codes_and_fitting_statuses(served):
    url = served.url
    not_json = httpx.post(f"{url}/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["code"] == "BAD_REQUEST"
    unknown = httpx.post(f"{url}/v1/jobs", json={"workflow": "nope"})
    assert unknown.status_code == 422 and unknown.json()["code"] == "UNKNOWN_WORKFLOW"
    typo = httpx.post(f"{url}/v1/jobs", json={"workflow": "txt2img", "params": {"stpes": 3}})
    assert typo.status_code == 422 and "did you mean 'steps'" in typo.json()["message"]
    assert httpx.get(f"{url}/v1/sessions/ses-none").json()["code"] == "NOT_FOUND"
    assert httpx.get(f"{url}/v1/sessions/ses-none").status_code == 404
    big = httpx.post(f"{url}/v1/jobs", content=b"{" + b" " * 2_100_000 + b"}", headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["code"] == "TOO_LARGE"
    key = httpx.post(f"{url}/v1/jobs", json={"workflow": "txt2img"}, headers={"Idempotency-Key": "../etc"})
    assert key.status_code == 422
    held = httpx.post(f"{url}/v1/jobs", json={"workflow": "txt2img", "hold": True,
                                             "params": {"width": 64, "height": 64, "steps": 2}}).json()["session_id"]
    assert httpx.post(f"{url}/v1/sessions/{held}/cancel").json()["events"][0] == "session.cancelled"
    again = httpx.post(f"{url}/v1/sessions/{held}/pause")
    assert again.status_code == 409 and again.json()["code"] == "INVALID_TRANSITION"
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, format="PNG")  # 64 Mpx: over limits.max_image_pixels, tiny as a file
    edited = httpx.post(f"{url}/sdapi/v1/img2img", json={"init_images": [base64.b64encode(bomb.getvalue()).decode()],
                                                         "prompt": "x", "width": 64, "height": 64})
    assert edited.status_code == 422 and "max_image_pixels" in edited.json()["message"]
    assert list((served.install.config.inbox / "images" / "uploads").glob("*")) == []
    assert httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "restore_faces": True}).status_code == 422


def test_the_openai_client_generates_and_its_retries_find_the_same_job(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=2)
    made = client.images.generate(prompt="a red fox", size="64x64", n=2, extra_body={"steps": 2, "seed": 7},
                                  extra_headers={"Idempotency-Key": "fox-1"})
    assert len(made.data) == 2 and made.data[0].revised_prompt == "a red fox"
    picture = Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json)))
    assert picture.size == (64, 64) and "Seed: 7" in picture.info["parameters"]
    again = client.images.generate(prompt="a red fox", size="64x64", n=2, extra_body={"steps": 2, "seed": 7},
                                   extra_headers={"Idempotency-Key": "fox-1"})
    assert again.data[0].b64_json == made.data[0].b64_json
    assert query(served.install, "SELECT count(*) FROM sessions WHERE job_id = 'fox-1'") == [(1,)]
    linked = client.images.generate(prompt="a blue fox", size="64x64", response_format="url", extra_body={"steps": 2})
    assert httpx.get(linked.data[0].url).headers["content-type"] == "image/png"
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt="x", size="64x64", model="no-such-model")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    edited = client.images.edit(image=("start.png", _png(Image.new("RGB", (64, 64), "red")), "image/png"),
                                mask=("mask.png", _png(mask), "image/png"), prompt="a door", size="64x64",
                                extra_body={"steps": 4})
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (64, 64)
    assert query(served.install, "SELECT workflow_id FROM sessions WHERE params LIKE '%a door%'") == [("inpaint",)]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_webuiapi_drives_it_as_automatic1111(served):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=served.port, steps=2)
    made = api.txt2img(prompt="a fox", width=64, height=64, seed=5, cfg_scale=5, batch_size=2)
    assert len(made.images) == 2 and made.image.size == (64, 64)
    assert made.info["seed"] == 5 and made.info["all_seeds"] == [5, 6] and "Seed: 5" in made.info["infotexts"][0]
    again = api.img2img(images=[made.image], prompt="a fox at night", width=64, height=64, denoising_strength=0.6,
                        steps=4, sampler_name="DPM++ 2M", scheduler="Karras")
    assert again.image.size == (64, 64)
    assert query(served.install, "SELECT workflow_id FROM sessions WHERE params LIKE '%night%'") == [("img2img",)]
    assert api.get_sd_models()[0]["model_name"] == "tiny"
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert api.util_get_current_model().startswith("tiny")
    assert api.get_progress()["progress"] == 0.0
    assert api.interrupt() is None


def test_tokens_guard_every_route_but_healthz_and_a_public_bind_needs_them(tmp_path, tiny_model):
    install = Installation(tmp_path / "engine")
    refused = subprocess.run([sys.executable, "-m", "engine", "serve", "--host", "0.0.0.0", "--port", "1"],
                             env=install.env(), cwd=install.folder, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "needs tokens" in refused.stderr
    server = Served(install, "--no-runner", env={"ENGINE_SERVER_TOKENS": "s3cret,other",
                                                  "ENGINE_SERVER_CORS_ORIGINS": "http://studio.example"})
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        preflight = httpx.options(f"{server.url}/v1/jobs", headers={
            "Origin": "http://studio.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers.get("access-control-allow-origin") == "http://studio.example"
        elsewhere = httpx.options(f"{server.url}/v1/jobs", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in elsewhere.headers
        denied = httpx.get(f"{server.url}/v1/sessions")
        assert denied.status_code == 401 and denied.json()["code"] == "UNAUTHORIZED"
        assert httpx.get(f"{server.url}/v1/sessions", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.url}/v1/sessions", headers={"Authorization": "Bearer other"}).status_code == 200
        assert httpx.get(f"{server.url}/sdapi/v1/sd-models", auth=("user", "s3cret")).status_code == 200
        assert httpx.get(f"{server.url}/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        ready = httpx.get(f"{server.url}/readyz", headers={"Authorization": "Bearer s3cret"})
        assert ready.status_code == 503, "no runner is live anywhere"
    finally:
        assert server.stop() == 0
        install.engine.close()


def _events(url: str, params: dict, headers: dict, want: int, seen: list, stop_at: int | None = None) -> None:
    with httpx.stream("GET", f"{url}/v1/events", params=params, headers=headers, timeout=60) as response:
        event_id = None
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: ") and event_id is not None:
                seen.append((event_id, json.loads(line[6:])["type"]))
                event_id = None
                if len(seen) >= want or (stop_at is not None and len(seen) >= stop_at):
                    return


def test_events_stream_in_order_and_a_reconnect_with_last_event_id_has_no_gap_or_repeat(served):
    url = served.url
    ids = [httpx.post(f"{url}/v1/jobs", json={"workflow": "txt2img", "hold": True, "params": {
        "prompt": f"p{n}", "width": 64, "height": 64, "steps": 2}}).json()["session_id"] for n in range(2)]
    for session_id in ids:
        httpx.post(f"{url}/v1/sessions/{session_id}/resume")
    for session_id in ids:
        _wait_ended(url, session_id)
    stored = [(row[0], row[1]) for row in query(served.install, "SELECT event_id, type FROM events "
                                                                "WHERE stream_id = :id ORDER BY event_id", id=ids[0])]
    seen: list = []
    _events(url, {"session": ids[0], "after": 0}, {}, len(stored), seen, stop_at=3)
    _events(url, {"session": ids[0]}, {"Last-Event-ID": str(seen[-1][0])}, len(stored), seen)
    assert seen == stored
    everything: list = []
    _events(url, {"after": 0}, {}, 10**9, everything, stop_at=len(query(served.install, "SELECT event_id FROM events")))
    assert [e for e, _ in everything] == sorted(e for e, _ in everything)


def test_sigkill_mid_generation_then_a_retry_with_the_same_key_gets_the_finished_job(tmp_path, tiny_model,
                                                                                      database_url):
    install = Installation(tmp_path / "engine", database_url=database_url, settings={"runner": {"lease_seconds": 3.0}})
    install.engine.models.add(tiny_model, "tiny")
    job = {"workflow": "txt2img", "params": {"prompt": "slow", "width": 128, "height": 128, "steps": 60, "num_images": 2}}
    server = Served(install, "--runner-id", "web-1")
    try:
        first = httpx.post(f"{server.url}/v1/jobs", json=job, headers={"Idempotency-Key": "kill-1"})
        assert first.status_code == 201
        session_id = first.json()["session_id"]
        deadline = time.monotonic() + 60
        while not query(install, "SELECT 1 FROM leases WHERE session_id = :id AND step_index = 2", id=session_id):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.stop(signal.SIGKILL)
        server = Served(install, "--runner-id", "web-1")
        again = httpx.post(f"{server.url}/v1/jobs", json=job, headers={"Idempotency-Key": "kill-1"})
        assert again.status_code == 200 and again.json()["session_id"] == session_id
        report = _wait_ended(server.url, session_id, timeout=300)
        assert report["status"] == "completed" and len(report["images"]) == 2
        assert query(install, "SELECT count(*) FROM sessions") == [(1,)]
        assert install.store.verify() == []
    finally:
        server.stop()
        install.engine.close()


def test_sigterm_answers_a_waiting_request_503_with_retry_after_and_hands_the_step_back(served):
    answers: list = []

    def wait_for_images() -> None:
        answers.append(httpx.post(f"{served.url}/v1/images/generations", timeout=120, headers={
            "Idempotency-Key": "term-1"}, json={"prompt": "slow", "size": "256x256", "n": 4, "steps": 150}))

    waiting = threading.Thread(target=wait_for_images)
    waiting.start()
    deadline = time.monotonic() + 60
    while not query(served.install, "SELECT 1 FROM leases l JOIN sessions s ON s.session_id = l.session_id "
                                    "WHERE s.job_id = 'term-1' AND l.step_index = 2"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # into the denoising loop
    assert served.stop(signal.SIGTERM) == 0
    waiting.join(timeout=60)
    assert answers[0].status_code == 503 and answers[0].headers["retry-after"] == "5"
    assert answers[0].json()["code"] == "STOPPING"
    released = query(served.install, "SELECT data FROM events WHERE type = 'step.released'")
    assert [json.loads(row[0])["reason"] for row in released] == ["stopping"]
    assert query(served.install, "SELECT st.status, st.attempts FROM steps st JOIN sessions s ON s.session_id = "
                                 "st.session_id WHERE s.job_id = 'term-1' AND st.step_index = 2") == [("pending", 0)]
    assert query(served.install, "SELECT count(*) FROM leases") == [(0,)], "nothing waits for a lease to lapse"


def test_the_openapi_document_lists_every_door_and_cors_is_off_unless_asked(served):
    preflight = httpx.options(f"{served.url}/v1/jobs", headers={"Origin": "http://studio.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    paths = httpx.get(f"{served.url}/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/sessions/{session_id}", "/v1/events", "/v1/images/generations", "/sdapi/v1/txt2img",
                 "/sdapi/v1/img2img", "/readyz"):
        assert path in paths, path
    assert os.environ.get("ENGINE_SERVER_TOKENS") is None
