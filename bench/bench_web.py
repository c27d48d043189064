"""The web page, measured in a real browser (Debian's chromium, headless, through Playwright)
against a real `engine serve`:

- the queue page with 10,000 sessions in the store: how long it takes to load (the browser's own
  navigation timing), and from a job's commit to the page showing it (no reload: the event
  stream, then the fragment fetched again);
- the gallery with 5,000 images made by the tiny model: scrolled to the end, how many full-size
  PNGs it loaded (none: thumbnails only), and how long the scroll took.

    python bench/bench_web.py [--sessions 10000] [--images 5000] [--out bench/results/web.json]

Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import commands  # noqa: E402
from engine.ingest.jobs import parse_job  # noqa: E402
from tests.conftest import Installation  # noqa: E402
from tests.helpers import query  # noqa: E402
from tests.served import Served  # noqa: E402

FULL_IMAGE = re.compile(r"/v1/sessions/[^/]+/images/\d+$")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def fill_queue(install: Installation, sessions: int) -> float:
    """`sessions` no-op sessions, a tenth of them held; returns the seconds it took."""
    started = time.perf_counter()
    for n in range(sessions):
        job = {"workflow": "noop1", "job_id": f"queued-{n}", "priority": n % 10, "hold": n % 10 == 0,
               "params": {"prompt": f"queued {n}"}}
        commands.submit(install.store, install.intake, parse_job(job, install.intake.limits),
                        commands.Source(f"bench-{n}.json", f"{n:064x}"))
    return time.perf_counter() - started


def queue_page(browser, url: str, loads: int, updates: int) -> dict:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    timings = []
    for _ in range(loads):
        page.goto(url + "/")
        timings.append(page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0]; "
                                     "return {response: n.responseEnd - n.startTime, "
                                     "ready: n.domContentLoadedEventEnd - n.startTime, "
                                     "load: n.loadEventEnd - n.startTime}; }"))
    page.locator("#live[data-state=live]").wait_for()
    lags = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for n in range(updates):
            name = f"watched-{n}"
            page.evaluate("""(name) => new Promise((ready) => {
                window.seenAt = null;
                const look = () => { if (!window.seenAt && [...document.querySelectorAll('#queue a')]
                    .some(a => a.textContent === name)) window.seenAt = Date.now(); };
                new MutationObserver(look).observe(document.querySelector('#queue'), {childList: true, subtree: true});
                ready();
            })""", name)
            answer = http.post("/v1/jobs", json={"workflow": "noop1", "job_id": name, "priority": 100, "hold": True,
                                                 "params": {"prompt": name}})
            committed = time.time() * 1000  # answered: committed
            assert answer.status_code == 201, answer.text
            page.wait_for_function("() => window.seenAt !== null", timeout=30_000)
            lags.append(page.evaluate("() => window.seenAt") - committed)
            page.wait_for_timeout(300)
    page.close()
    return {"loads": loads, "response_ms_p50": round(statistics.median(t["response"] for t in timings), 1),
            "dom_ready_ms_p50": round(statistics.median(t["ready"] for t in timings), 1),
            "dom_ready_ms_max": round(max(t["ready"] for t in timings), 1),
            "load_ms_p50": round(statistics.median(t["load"] for t in timings), 1),
            "update_after_commit_ms_p50": round(statistics.median(lags), 1),
            "update_after_commit_ms_max": round(max(lags), 1), "updates": updates, "console_errors": errors}


def make_images(install: Installation, images: int, per_session: int) -> float:
    started = time.perf_counter()
    for n in range(images // per_session):
        job = {"workflow": "txt2img", "job_id": f"gallery-{n}",
               "params": {"prompt": f"picture {n}", "width": 64, "height": 64, "steps": 1, "num_images": per_session,
                          "seed": n * per_session}}
        commands.submit(install.store, install.intake, parse_job(job, install.intake.limits),
                        commands.Source(f"gallery-{n}.json", f"{n:064x}"))
    done = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--log-format", "json"],
                          env=install.env(), cwd=install.folder, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - started


def gallery(browser, url: str, expected: int) -> dict:
    """Scrolled to the end (each time to the bottom, as a user flinging the page): every page of
    48 fetched; the thumbnails the browser loaded on the way (lazily: those that came near the
    screen); no full-size PNG."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    started = time.perf_counter()
    page.goto(url + "/gallery")
    figures = page.locator("#gallery figure")
    shown = figures.count()
    while page.locator("#gallery .more").count():
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function(f"() => document.querySelectorAll('#gallery figure').length > {shown} || "
                               "!document.querySelector('#gallery .more')", timeout=30_000)
        shown = figures.count()
        assert time.perf_counter() - started < 900, shown
    scrolled = time.perf_counter() - started
    page.wait_for_timeout(1000)  # the last screen's thumbnails
    full = [u for u in requests if FULL_IMAGE.search(u.split("?")[0])]
    thumbs = [u for u in requests if u.split("?")[0].endswith("/thumbnail")]
    pages = [u for u in requests if "/ui/gallery" in u]
    page.close()
    return {"images": shown, "expected": expected, "scroll_to_end_s": round(scrolled, 1),
            "pages_fetched": len(pages) + 1, "thumbnails_requested": len(thumbs), "full_pngs_requested": len(full),
            "console_errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--per-session", type=int, default=100)
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parts", nargs="+", default=["queue", "gallery"], choices=["queue", "gallery"])
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from engine.domains.tinymodels import build_tiny_sdxl

    folder = Path(tempfile.mkdtemp(prefix="bench-web-"))
    report: dict = {}

    def said() -> None:  # each part's figures as soon as they are measured
        print(json.dumps(report, indent=2), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        if "queue" in args.parts:
            install = Installation(folder / "queue")
            report["fill_seconds"] = round(fill_queue(install, args.sessions), 1)
            report["sessions_in_store"] = query(install, "SELECT count(*) FROM sessions")[0][0]
            server = Served(install, "--no-runner")
            try:
                report["queue"] = queue_page(browser, server.url, args.loads, args.updates)
            finally:
                server.stop()
                install.engine.close()
            said()
        if "gallery" in args.parts:
            install = Installation(folder / "gallery", settings={"limits": {"max_num_images": args.per_session}})
            install.engine.models.add(build_tiny_sdxl(folder / "tiny"), "tiny")
            report["generate_seconds"] = round(make_images(install, args.images, args.per_session), 1)
            server = Served(install, "--no-runner")
            try:
                report["gallery"] = gallery(browser, server.url, args.images)
            finally:
                server.stop()
                install.engine.close()
            said()
        browser.close()


if __name__ == "__main__":
    main()
