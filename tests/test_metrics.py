"""Prometheus metrics, scraped from a real `engine serve` and a real `engine run --metrics-port`
and parsed with prometheus-client's own parser: the queue figures equal what SQL counts, and the
process counters count what the process did."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Installation
from tests.helpers import query, submit
from tests.receiver import Receiver
from tests.served import Served, free_port
from tests.test_notify import SECRET


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_the_queue_gauges_equal_the_sql_counts(tmp_path):
    install = Installation(tmp_path / "engine")
    for n in range(4):
        submit(install, {"workflow": "noop1", "job_id": f"p-{n}", "params": {"prompt": "x"}})
    for n in range(2):
        submit(install, {"workflow": "noop1", "job_id": f"h-{n}", "hold": True, "params": {"prompt": "x"}})
    oldest = time.time()
    server = Served(install, "--no-runner")
    try:
        samples = scrape(f"{server.url}/metrics")
    finally:
        server.stop()
        install.engine.close()
    counted = dict(query(install, "SELECT status, count(*) FROM session_status GROUP BY status"))
    for status in ("pending", "running", "paused", "completed", "failed", "cancelled"):
        assert value(samples, "engine_sessions", status=status) == counted.get(status, 0), status
    assert value(samples, "engine_store_up") == 1
    waited = value(samples, "engine_queue_oldest_pending_seconds")
    assert 0 < waited < time.time() - oldest + 30
    assert value(samples, "engine_runners", status="running") == 0


def test_a_runner_counts_its_steps_inbox_files_and_webhooks_on_its_own_port(tmp_path):
    receiver = Receiver()
    install = Installation(tmp_path / "engine", settings={"notify": {
        "secret": SECRET, "allow_private": True, "poll_seconds": 0.05}})
    port = free_port()
    runner = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet", "--runner-id", "metered",
                               "--metrics-port", str(port)], env=install.env(), cwd=install.folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for n in range(3):
            submit(install, {"workflow": "noop1", "params": {"prompt": "x"},
                             **({"notify": {"url": receiver.url}} if n == 0 else {})})
        (install.config.inbox / "one.json").write_text(json.dumps({"workflow": "noop1", "params": {"prompt": "f"}}))
        (install.config.inbox / "bad.json").write_text("{not json")
        deadline = time.monotonic() + 60
        while True:
            done = query(install, "SELECT count(*) FROM sessions WHERE status = 'completed'")[0][0]
            delivered = query(install, "SELECT count(*) FROM deliveries WHERE status = 'delivered'")[0][0]
            if done == 4 and delivered == 1:
                break
            assert time.monotonic() < deadline, (done, delivered)
            time.sleep(0.1)
        time.sleep(1.2)  # a heartbeat with the worker's memory
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
        receiver.close()
    completed_steps = query(install, "SELECT count(*) FROM events WHERE type = 'step.completed'")[0][0]
    counted = sum(v for (name, labels), v in samples.items()
                  if name == "engine_steps_total" and ("outcome", "completed") in labels)
    assert counted == completed_steps > 0
    assert value(samples, "engine_sessions", status="completed") == 4
    assert value(samples, "engine_inbox_files_total", outcome="accepted") == 1
    assert value(samples, "engine_inbox_files_total", outcome="rejected") == 1
    assert value(samples, "engine_webhook_deliveries_total", outcome="delivered") == 1
    assert value(samples, "engine_webhook_deliveries_by_status", status="delivered") == 1
    assert 0 <= value(samples, "engine_runner_heartbeat_age_seconds", runner="metered") < 30
    assert value(samples, "engine_gpu_memory_bytes", runner="metered", device="cpu") > 0


def test_images_and_calls_are_counted_by_model(tmp_path, tiny_model):
    install = Installation(tmp_path / "engine")
    install.engine.models.add(tiny_model, "tiny")
    server = Served(install)
    try:
        answer = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "counted", "n": 2,
                                                                          "size": "64x64", "steps": 2},
                            timeout=120)
        assert answer.status_code == 200, answer.text
        samples = scrape(f"{server.url}/metrics")
    finally:
        server.stop()
        install.engine.close()
    assert value(samples, "engine_images_total", model="tiny") == 2
    assert value(samples, "engine_call_images_count") == 1 and value(samples, "engine_call_images_sum") == 2
    assert value(samples, "engine_call_seconds_count", model="tiny", compiled="false") == 1
    assert value(samples, "engine_step_duration_seconds_count", domain="inference") == 1


def test_with_tokens_a_scrape_without_one_is_401_not_the_login_page(tmp_path):
    install = Installation(tmp_path / "engine")
    server = Served(install, "--no-runner", env={"ENGINE_SERVER_TOKENS": "scrape-token"})
    try:
        refused = httpx.get(f"{server.url}/metrics", follow_redirects=False)
        assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHORIZED"
        taken = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert taken.status_code == 200 and "engine_sessions" in taken.text
    finally:
        server.stop()
        install.engine.close()
