"""The web page in a real browser: Debian's chromium, driven headless by Playwright, against a
real `engine serve` on a tiny diffusers model built in code. A job submitted through the form
shows its progress bar move and its image load; pause, resume and cancel work from a session's
page; the queue page keeps updating across a server killed and started again; the gallery
scrolls on thumbnails alone; with tokens, nothing works without the login; no page logs a
console error, at 1280x800 or on a 390x844 phone. Screenshots go to ENGINE_TEST_SCREENSHOTS
(else the test's folder)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Installation
from tests.served import Served

pytestmark = pytest.mark.slow
playwright_api = pytest.importorskip("playwright.sync_api")

SIZES = {"wide": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
FULL_IMAGE = re.compile(r"/v1/sessions/[^/]+/images/\d+$")


def chromium_path() -> str | None:
    return os.environ.get("ENGINE_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("ENGINE_TEST_REQUIRE_BROWSER"):
            pytest.fail("no chromium found (apt-get install -y chromium), and ENGINE_TEST_REQUIRE_BROWSER is set")
        pytest.skip("no chromium: apt-get install -y chromium")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


class Watched:
    """A browser page whose console errors and failed requests are kept, and asserted to be none."""

    def __init__(self, browser, size: str = "wide", **context) -> None:
        self.context = browser.new_context(viewport=SIZES[size], **context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def shot(self, name: str) -> Path:
        folder = Path(os.environ.get("ENGINE_TEST_SCREENSHOTS") or self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser, tmp_path):
    opened: list[Watched] = []

    def open_page(size: str = "wide", **context) -> Watched:
        page = Watched(browser, size, **context)
        page.folder = tmp_path / "screenshots"
        opened.append(page)
        return page

    yield open_page
    errors = [e for page in opened for e in page.errors]
    for page in opened:
        page.close()
    assert errors == [], errors


@pytest.fixture
def serve(tmp_path, tiny_model):
    """Start `engine serve` on an installation with the tiny model and these settings."""
    started: list[tuple[Served, Installation]] = []

    def start(settings: dict | None = None) -> Served:
        install = Installation(tmp_path / "engine", settings={"runner": {"lease_seconds": 5.0}, **(settings or {})})
        install.engine.models.add(tiny_model, "tiny")
        started.append((Served(install), install))
        return started[-1][0]

    yield start
    for server, install in started:
        server.stop()
        install.engine.close()


@pytest.fixture
def served(serve):
    return serve()


def _post(server: Served, job: dict, key: str | None = None) -> str:
    answer = httpx.post(f"{server.url}/v1/jobs", json=job, headers={"Idempotency-Key": key} if key else {})
    assert answer.status_code == 201, answer.text
    return answer.json().get("session_id") or answer.json()["batch_id"]


def _wait_status(server: Served, session_id: str, wanted: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = httpx.get(f"{server.url}/v1/sessions/{session_id}").json()
        if report["status"] in wanted:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.1)


def _wait_running_step(server: Served, session_id: str, step_type: str = "inference_generation") -> None:
    deadline = time.monotonic() + 120
    while True:
        report = httpx.get(f"{server.url}/v1/sessions/{session_id}").json()
        steps = {s["step_type"]: s["status"] for s in report["steps"]}
        if steps.get(step_type) == "running" and (report.get("activity") or "").startswith("denoising"):
            return
        assert report["status"] in ("pending", "running") and time.monotonic() < deadline, report
        time.sleep(0.05)


LONG = {"workflow": "txt2img", "params": {"prompt": "a long one", "width": 192, "height": 192, "steps": 150}}


def test_a_job_submitted_through_the_form_shows_its_progress_moving_and_then_its_image(served, watched):
    view = watched()
    page = view.page
    page.goto(f"{served.url}/submit")
    page.get_by_label("Prompt", exact=True).fill("a lighthouse from the form")
    page.get_by_label("Width").fill("128")
    page.get_by_label("Height").fill("128")
    page.get_by_label("Steps", exact=True).fill("120")
    page.get_by_label("Seed").fill("7")
    preview = page.locator("#job-preview")
    assert '"prompt": "a lighthouse from the form"' in preview.inner_text()
    assert '"steps": 120' in preview.inner_text() and '"seed": 7' in preview.inner_text()
    page.get_by_role("button", name="Submit").click()
    bar = page.locator("#submit-result progress")
    bar.wait_for()
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    status = page.locator("#submit-result .status-line")
    while status.get_attribute("data-status") != "completed":
        value = int(bar.evaluate("b => b.value"))
        if 0 < value < 100:
            seen.add(value)
        assert time.monotonic() < deadline, (seen, status.inner_text())
        page.wait_for_timeout(50)
    assert len(seen) >= 2, f"the progress bar did not move through values between 0 and 100: {seen}"
    image = page.locator("#submit-result img.result")
    image.wait_for()
    page.wait_for_function("() => document.querySelector('#submit-result img.result').naturalWidth > 0")
    link = page.locator("#submit-result h2 a")
    session_id = link.get_attribute("href").rsplit("/", 1)[1]
    report = httpx.get(f"{served.url}/v1/sessions/{session_id}").json()
    assert report["status"] == "completed" and report["params"]["prompt"] == "a lighthouse from the form"
    assert report["params"]["seed"] == 7 and report["params"]["steps"] == 120
    view.shot("submit-done")


def test_an_image_uploaded_in_the_form_is_the_init_image_of_the_job(served, watched, tmp_path):
    from PIL import Image

    picture = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    page = watched().page
    page.goto(f"{served.url}/submit")
    page.locator("#workflow").select_option("img2img")
    page.get_by_label("Prompt", exact=True).fill("from an upload")
    page.get_by_label("Steps", exact=True).fill("4")
    page.get_by_label("Init Image").set_input_files(str(picture))
    page.locator("[data-upload-of=init_image]").filter(has_text="uploaded as").wait_for()
    assert '"init_image": "images/uploads/' in page.locator("#job-preview").inner_text()
    page.get_by_role("button", name="Submit").click()
    page.locator('#submit-result .status-line[data-status="completed"]').wait_for(timeout=120_000)
    page.locator("#submit-result img.result").wait_for()


def test_a_refused_job_says_its_code_in_the_form_and_nothing_is_recorded(served, watched):
    view = watched()
    page = view.page
    page.goto(f"{served.url}/submit")
    page.get_by_label("Prompt", exact=True).fill("too wide")
    page.get_by_label("Width").fill("20000")
    page.get_by_label("Loras").fill("[{\"model\": \"no-such-lora\"}]")
    page.get_by_role("button", name="Submit").click()
    error = page.locator("#submit-error")
    error.filter(has_text="VALIDATION_ERROR").wait_for()
    assert "width" in error.inner_text()
    assert httpx.get(f"{served.url}/v1/sessions").json()["sessions"] == []
    view.errors[:] = [e for e in view.errors if "422" not in e]  # chromium logs the refused request


def test_pause_then_resume_a_running_session_from_its_page(served, watched):
    session_id = _post(served, LONG)
    _wait_running_step(served, session_id)
    view = watched()
    page = view.page
    page.goto(f"{served.url}/sessions/{session_id}")
    page.locator("#session-status", has_text="running").wait_for()
    page.get_by_label("Priority", exact=True).fill("42")
    page.get_by_role("button", name="Set priority").click()
    page.locator("#toast", has_text="session.reprioritized").wait_for()
    assert httpx.get(f"{served.url}/v1/sessions/{session_id}").json()["priority"] == 42
    page.get_by_role("button", name="Pause").click()
    page.locator("#session-status", has_text="paused").wait_for(timeout=30_000)
    assert _wait_status(served, session_id, ("paused",))["status"] == "paused"
    view.shot("session-paused")
    page.get_by_role("button", name="Resume").click()
    page.locator("#session-status", has_text=re.compile("pending|running")).wait_for(timeout=30_000)
    # it goes on where it was: running again, its bar moving on from where the pause left it
    page.locator("#session-status", has_text="running").wait_for(timeout=30_000)
    httpx.post(f"{served.url}/v1/sessions/{session_id}/cancel")  # the rest of its 150 steps are not needed


def test_cancel_a_running_session_from_its_page_and_see_it_cancelled(served, watched):
    session_id = _post(served, LONG)
    _wait_running_step(served, session_id)
    view = watched()
    page = view.page
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{served.url}/sessions/{session_id}")
    # the bar moves while the page is open (progress frames, no reload)
    bar = page.locator(f'[data-progress-of="{session_id}"]')
    first = float(bar.evaluate("b => b.value"))
    page.wait_for_function(f"() => document.querySelector('[data-progress-of=\"{session_id}\"]').value > {first}",
                           timeout=30_000)
    view.shot("session-running")
    page.get_by_role("button", name="Cancel").click()
    page.locator("#session-status", has_text="cancelled").wait_for(timeout=30_000)
    assert page.locator(".error-text", has_text="CANCELLED").count() == 1
    assert _wait_status(served, session_id, ("cancelled",))["status"] == "cancelled"


def test_the_queue_page_keeps_updating_after_the_server_is_killed_and_started_again(served, watched):
    view = watched()
    page = view.page
    page.goto(served.url + "/")
    page.locator("#live[data-state=live]").wait_for()
    first = _post(served, {"workflow": "txt2img", "job_id": "before-the-kill",
                           "params": {"width": 64, "height": 64, "steps": 2}})
    page.locator("#queue a", has_text="before-the-kill").wait_for(timeout=10_000)
    page.evaluate("window.notReloaded = true")
    port, install = served.port, served.install
    served.stop(signal.SIGKILL)
    page.locator("#live[data-state=down]").wait_for(timeout=10_000)
    again = Served(install, port=port)
    try:
        page.locator("#live[data-state=live]").wait_for(timeout=30_000)
        view.errors.clear()  # the browser logged each refused reconnect while the server was down
        _post(again, {"workflow": "txt2img", "job_id": "after-the-restart", "params": {"width": 64, "height": 64,
                                                                                      "steps": 2}})
        page.locator("#queue a", has_text="after-the-restart").wait_for(timeout=10_000)
        assert page.evaluate("window.notReloaded") is True, "the page was reloaded"
        _wait_status(again, first, ("completed",))
        view.shot("queue")
    finally:
        again.stop()


def test_the_queue_shows_each_new_session_without_a_reload(served, watched):
    page = watched().page
    page.goto(served.url + "/")
    page.locator("#live[data-state=live]").wait_for()
    page.evaluate("window.notReloaded = true")
    held = {"workflow": "txt2img", "hold": True, "params": {"width": 64, "height": 64, "steps": 2}}
    for number in range(3):
        _post(served, {**held, "job_id": f"held-{number}"})
        page.locator("#queue a", has_text=f"held-{number}").wait_for(timeout=10_000)
    assert page.locator(".counts .s-paused strong").inner_text() == "3"
    assert page.evaluate("window.notReloaded") is True


def test_the_gallery_scrolls_on_thumbnails_and_filters_by_prompt_and_job(serve, watched):
    served = serve({"limits": {"max_num_images": 40}})
    for number, prompt in enumerate(["a red fox", "a blue whale", "a green owl"]):
        _post(served, {"workflow": "txt2img", "job_id": f"g-{number}",
                       "params": {"prompt": prompt, "width": 64, "height": 64, "steps": 1, "num_images": 40}})
    deadline = time.monotonic() + 300
    while httpx.get(f"{served.url}/v1/sessions", params={"status": "completed"}).json()["sessions"].__len__() < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    view = watched("phone")
    page = view.page
    page.goto(f"{served.url}/gallery")
    figures = page.locator("#gallery figure")
    assert figures.count() == 48
    for _ in range(100):
        page.mouse.wheel(0, 1200)
        page.wait_for_timeout(100)
        if figures.count() == 120 and page.locator("#gallery .more").count() == 0:
            break
    assert figures.count() == 120
    for image in page.locator("#gallery img").all():  # lazy: each loads when it comes near the screen
        image.scroll_into_view_if_needed()
        image.evaluate("i => i.complete ? true : new Promise(done => i.addEventListener('load', done))")
        assert image.evaluate("i => i.naturalWidth") > 0
    full = [url for url in view.requests if FULL_IMAGE.search(url.split("?")[0])]
    assert full == [], f"the gallery loaded full-size PNGs: {full[:3]}"
    assert sum("/thumbnail" in url for url in view.requests) == 120
    view.shot("gallery-phone")
    page.goto(f"{served.url}/gallery?q=WHALE")
    assert figures.count() == 40 and all("whale" in t for t in figures.locator(".prompt").all_inner_texts())
    page.goto(f"{served.url}/gallery?job=g-2")
    assert figures.count() == 40 and set(figures.locator(".prompt").all_inner_texts()) == {"a green owl"}
    page.locator("button[data-job-of]").first.click()
    page.locator("#job-dialog[open]").wait_for()  # filled once its fetch answers
    page.wait_for_function("() => document.querySelector('#job-text').value.length > 0")
    job = page.locator("#job-text").input_value()
    import json

    again = json.loads(job)
    first_image = httpx.get(f"{served.url}/v1/sessions/g-2").json()["images"][0]
    assert again["workflow"] == "txt2img" and again["params"]["prompt"] == "a green owl"
    assert "num_images" not in again["params"], "one picture: num_images 1, the default"
    assert first_image.endswith(f"-{again['params']['seed']}.png")
    # the job file it gives is one the engine takes
    assert httpx.post(f"{served.url}/v1/jobs", json={**again, "hold": True}).status_code == 201


def test_every_page_at_both_sizes_has_no_console_error_and_no_sideways_scroll(served, watched):
    batch = _post(served, {"kind": "batch", "name": "three owls", "params": {"width": 64, "height": 64, "steps": 2},
                           "items": [{"prompt": f"owl {n}", "seed": n} for n in range(3)]})
    session = _post(served, {"workflow": "txt2img", "job_id": "one-picture",
                             "params": {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "num_images": 2}})
    _post(served, {"workflow": "txt2img", "job_id": "held-one", "hold": True, "params": {"width": 64, "height": 64}})
    _wait_status(served, session, ("completed",))
    deadline = time.monotonic() + 120
    while httpx.get(f"{served.url}/v1/batches/{batch}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pages = {"queue": "/", "session": f"/sessions/{session}", "batch": f"/batches/{batch}", "gallery": "/gallery",
             "submit": "/submit", "runners": "/runners", "missing": "/sessions/ses-none"}
    for size in SIZES:
        view = watched(size)
        for name, path in pages.items():
            response = view.page.goto(served.url + path)
            assert response.status == (404 if name == "missing" else 200), (name, response.status)
            view.page.wait_for_timeout(300)
            if name == "missing":  # chromium logs the 404 of the document itself
                view.errors[:] = [e for e in view.errors if "404" not in e]
            sideways = view.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert sideways <= 0, f"{name} at {size} scrolls sideways by {sideways} px"
            view.shot(f"{name}-{size}")
    # the runners page: the runner of this server, its worker and that worker's memory
    page = watched().page
    page.goto(f"{served.url}/runners")
    row = page.locator("#runners tbody tr").first
    assert "running" in row.inner_text() and re.search(r"cpu: [\d.]+ (MiB|GiB) of [\d.]+ GiB", row.inner_text())
    # the image viewer: a click on a thumbnail shows the full image and its A1111 parameters
    page = watched().page
    page.goto(f"{served.url}/sessions/{session}")
    page.locator("button[data-view]").first.click()
    page.locator("#viewer[open]").wait_for()
    assert "a lighthouse" in page.locator("#viewer-parameters").inner_text()
    assert "Steps: 2" in page.locator("#viewer-parameters").inner_text()
    page.wait_for_function("() => document.querySelector('#viewer-image').naturalWidth === 64")
    page.keyboard.press("Escape")
    assert page.locator("#viewer[open]").count() == 0
    # the batch page shows its contact sheet and one thumbnail per item
    page.goto(f"{served.url}/batches/{batch}")
    assert page.locator("img.sheet").count() == 1 and page.locator(".items img").count() == 3


def test_the_pages_work_from_the_keyboard(served, watched):
    session = _post(served, {"workflow": "txt2img", "job_id": "keyboard", "hold": True,
                             "params": {"width": 64, "height": 64, "steps": 2}})
    page = watched().page
    page.goto(served.url + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to the content"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "engine"
    for _ in range(20):  # through the nav and into the queue, to the held session's link
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "keyboard":
            break
    assert page.evaluate("document.activeElement.textContent") == "keyboard"
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/sessions/{session}")
    page.get_by_role("button", name="Resume").focus()
    page.keyboard.press("Enter")
    _wait_status(served, session, ("running", "completed"))


def test_with_tokens_nothing_works_without_the_login_and_the_cookie_is_http_only(serve, watched):
    server = serve({"server": {"tokens": ["s3cret;token"]}})
    view = watched()
    page = view.page
    for path in ("/", "/gallery", "/submit", "/runners", "/sessions/x"):
        page.goto(server.url + path)
        assert page.url.startswith(f"{server.url}/login"), path
    assert httpx.get(f"{server.url}/ui/queue").status_code == 401
    assert httpx.get(f"{server.url}/v1/events").status_code == 401
    page.goto(f"{server.url}/runners")
    page.get_by_label("Token").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    page.locator(".error-text", has_text="not one of").wait_for()
    page.wait_for_timeout(200)
    view.errors.clear()  # the 401 of the refused login
    page.get_by_label("Token").fill("s3cret;token")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{server.url}/runners")
    cookie = next(c for c in view.context.cookies() if c["name"] == "engine_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "engine_token" not in page.evaluate("document.cookie")
    page.goto(f"{server.url}/submit")
    page.get_by_label("Prompt", exact=True).fill("with a login")
    page.get_by_label("Steps", exact=True).fill("2")
    page.get_by_role("button", name="Submit").click()
    page.locator('#submit-result .status-line[data-status="completed"]').wait_for(timeout=120_000)
    # the cookie, sent by a page of another site, changes nothing
    jar = {"engine_token": cookie["value"]}
    forged = httpx.post(f"{server.url}/v1/jobs", json={"workflow": "txt2img"}, cookies=jar,
                        headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403 and forged.json()["code"] == "FORBIDDEN"
    blind = httpx.post(f"{server.url}/v1/jobs", json={"workflow": "txt2img"}, cookies=jar)
    assert blind.status_code == 403, "a cookie-borne change must say its origin"
    same = httpx.post(f"{server.url}/v1/jobs", json={"workflow": "txt2img", "hold": True}, cookies=jar,
                      headers={"Origin": server.url})
    assert same.status_code == 201
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{server.url}/login")
    page.goto(f"{server.url}/")
    assert page.url.startswith(f"{server.url}/login")
