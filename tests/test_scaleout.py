"""One worker per device inside a runner: devices from config, jobs pinned to a device, model
affinity, runners that say which devices they offer and sessions that say why they wait.

The rules are pure functions, tested alone and with hypothesis; the runner is tested with real
workers on a real SQLite file and PostgreSQL. This machine has only a CPU: workers that stand for
GPUs (`cuda:0`, `cuda:1`) run the no-op handlers, which never touch a device, so what is tested
there is which worker claims which session; the tiny-model tests run two real workers on the CPU.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.run.affinity import Candidate, Offer, choose, offers, pin_of, waiting_reason
from engine.domains.device import DeviceInfo, worker_devices
from engine.errors import DeviceUnavailable, ValidationError
from engine.outbox.folders import ATTEMPTS, Outbox
from engine.domains.catalogue import ModelRegistry
from engine.run.runner import lane_names
from tests.conftest import Installation
from tests.helpers import completions, query, run_until_idle, status, submit
from tests.test_worker import Pipe


def device(device_id: str, kind: str | None = None) -> DeviceInfo:
    kind = kind or device_id.split(":")[0]
    index = int(device_id.split(":")[1]) if ":" in device_id else 0
    return DeviceInfo(device_id, kind, index, f"stand-in {device_id}", 8 << 30, 8 << 30, True, True)


TWO_GPUS = [device("cuda:0"), device("cuda:1"), device("cpu")]


# the pure rules ------------------------------------------------------------------------------

def test_auto_means_every_device_of_the_preferred_kind():
    assert [d.id for d in worker_devices("auto", "auto", TWO_GPUS)] == ["cuda:0", "cuda:1"]
    assert [d.id for d in worker_devices("auto", "cuda", TWO_GPUS)] == ["cuda:0", "cuda:1"]
    assert [d.id for d in worker_devices("auto", "cuda:1", TWO_GPUS)] == ["cuda:1"]
    assert [d.id for d in worker_devices("auto", "cpu", TWO_GPUS)] == ["cpu"]
    assert [d.id for d in worker_devices("auto", "auto", [device("cpu")])] == ["cpu"]


def test_a_list_names_each_worker_and_a_device_named_twice_gets_two():
    assert [d.id for d in worker_devices(["cuda:1", "cuda:0"], "auto", TWO_GPUS)] == ["cuda:1", "cuda:0"]
    assert [d.id for d in worker_devices("cpu, cpu", "auto", TWO_GPUS)] == ["cpu", "cpu"]
    assert lane_names(["cpu", "cpu", "cuda:0"]) == ["cpu#1", "cpu#2", "cuda:0"]
    with pytest.raises(DeviceUnavailable, match="cuda:7"):
        worker_devices(["cuda:0", "cuda:7"], "auto", TWO_GPUS)


def test_a_pin_is_served_by_its_id_or_its_kind():
    assert pin_of({"device": "AUTO"}) == "" and pin_of({}) == "" and pin_of({"device": "Cuda:1"}) == "cuda:1"
    assert offers("", []) and offers("cuda", ["cuda:1"]) and offers("cuda:1", ["cpu", "cuda:1"])
    assert offers("cpu", ["cpu#2"]) and not offers("cuda:0", ["cuda:1", "cpu"])
    assert Offer("cuda:0", "rocm").claim_filter() == {"any_device": 0, "pin_id": "cuda:0", "pin_kind": "rocm",
                                                      "pin_alias": "cuda"}
    assert Offer().claim_filter()["any_device"] == 1  # a claim that is no worker's takes any pin
    assert waiting_reason("", ["cpu"]) is None
    assert "no runner is running" in waiting_reason("", [])
    assert "'cuda:1', which no live runner offers (live runners offer: cpu)" in waiting_reason("cuda:1", ["cpu"])


def test_choose_prefers_a_warm_model_within_the_lookahead_and_the_heads_priority():
    a, b, none = "a", "b", ""
    queue = [Candidate("s1", 5, b), Candidate("s2", 5, a), Candidate("s3", 1, a)]
    assert choose(queue, {a}, 32) == 1  # a warm model one place down, same priority
    assert choose(queue, {a}, 1) == 0  # lookahead 1: strictly in order
    assert choose(queue[::2], {a}, 32) == 0  # the warm one has a lower priority: priority rules
    assert choose([Candidate("s1", 0, none), Candidate("s2", 0, a)], {a}, 32) == 0  # needs no model
    far = [Candidate(f"s{i}", 0, b) for i in range(40)] + [Candidate("s40", 0, a)]
    assert choose(far, {a}, 32) == 0  # beyond the lookahead
    # nothing warm: the model with the most work waiting, its oldest session
    assert choose([Candidate("s1", 0, b), Candidate("s2", 0, a), Candidate("s3", 0, a)], set(), 32) == 1
    assert choose([Candidate("s1", 0, b), Candidate("s2", 0, a)], set(), 32) == 0  # a tie: the head


candidates = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["", "a", "b", "c"])), min_size=1, max_size=50).map(
    lambda rows: [Candidate(f"s{i}", p, m) for i, (p, m) in
                  enumerate(sorted(rows, key=lambda row: -row[0]))])


@settings(max_examples=300, deadline=None)
@given(candidates, st.sets(st.sampled_from(["a", "b", "c"])), st.integers(1, 40))
def test_choose_never_passes_a_higher_priority_nor_looks_past_its_lookahead(queue, warm, lookahead):
    index = choose(queue, warm, lookahead)
    chosen, head = queue[index], queue[0]
    assert chosen.priority == head.priority
    assert index < max(lookahead, 1)
    window = [c for c in queue[:lookahead] if c.priority == head.priority]
    if not head.model or head.model in warm:
        assert index == 0
    elif any(c.model in warm for c in window if c.model):
        assert chosen.model in warm and all(c.model not in warm for c in window[:index] if c.model)
    elif lookahead > 1:
        counts = Counter(c.model for c in window if c.model)
        assert counts[chosen.model] == max(counts.values())
        assert all(c.model != chosen.model for c in window[:index])


# the runner's workers ------------------------------------------------------------------------

def claims(install) -> list[dict]:
    return [json.loads(row[0]) for row in query(install, "SELECT data FROM events WHERE type = 'step.claimed' "
                                                         "ORDER BY event_id")]


def test_two_workers_in_one_runner_share_the_queue_and_run_each_step_once(backend_install):
    sessions = [submit(backend_install, {"workflow": "sleepy", "params": {"steps": 2}}).target_id for _ in range(8)]
    runner = backend_install.engine.runner(devices=[device("cpu")] * 2)
    try:
        runner.run(until_idle=True)
    finally:
        runner.close()
    assert {status(backend_install, s) for s in sessions} == {"completed"}
    counts = completions(backend_install)
    assert len(counts) == 8 * 3 and set(counts.values()) == {1}
    workers = Counter(c["worker"] for c in claims(backend_install))
    assert set(workers) == {"cpu#1", "cpu#2"}, workers
    (row,) = query(backend_install, "SELECT devices FROM runner_status WHERE runner_id = :id", id=runner.runner_id)
    assert json.loads(row[0]) == ["cpu#1", "cpu#2"]
    assert backend_install.store.verify() == []


def test_a_pinned_job_runs_only_on_a_worker_of_its_device(backend_install):
    runner = backend_install.engine.runner(devices=[device("cuda:0"), device("cuda:1")])
    try:
        runner.run(until_idle=True)  # registers it: its devices are known to the intake
        pinned = [submit(backend_install, {"workflow": "sleepy", "params": {"steps": 1, "device": "cuda:1"}}).target_id
                  for _ in range(4)]
        free = [submit(backend_install, {"workflow": "sleepy", "params": {"steps": 1}}).target_id for _ in range(4)]
        runner.run(until_idle=True)
    finally:
        runner.close()
    by_session = {}
    for claim in claims(backend_install):
        by_session.setdefault(claim["session_id"], set()).add(claim["worker"])
    assert all(by_session[s] == {"cuda:1"} for s in pinned), by_session
    assert set().union(*(by_session[s] for s in free)) <= {"cuda:0", "cuda:1"}
    assert {status(backend_install, s) for s in pinned + free} == {"completed"}


def test_a_job_pinned_to_a_device_no_runner_offers_is_refused_at_submit(install):
    with pytest.raises(ValidationError, match="no device 'cuda:7' on this machine .* nor in any runner"):
        submit(install, {"workflow": "noop1", "params": {"device": "cuda:7"}})


def test_a_pinned_session_whose_device_no_live_runner_offers_waits_and_says_why(install):
    gpu_runner = install.engine.runner(devices=[device("cuda:1")])
    gpu_runner.run(until_idle=True)
    gpu_runner.close()  # the host with the GPU goes away
    session_id = submit(install, {"workflow": "noop1", "params": {"device": "cuda:1"}}).target_id

    def report() -> dict:
        done = subprocess.run([sys.executable, "-m", "engine", "session", session_id, "--json"], env=install.env(),
                              capture_output=True, text=True, timeout=120, cwd=install.folder)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert "no runner is running" in report()["waiting"]
    cpu_runner = install.engine.runner(devices=[device("cpu")])
    thread = threading.Thread(target=cpu_runner.run)
    thread.start()
    try:
        time.sleep(0.5)  # it registers, claims nothing: the only session is pinned elsewhere
        shown = report()
        assert shown["status"] == "pending"
        assert "pinned to device 'cuda:1', which no live runner offers (live runners offer: cpu)" in shown["waiting"]
        pipe = Pipe(install, "--no-runner")  # the design notes' worker says the same
        try:
            assert "which no live runner offers" in pipe.call("get_session_status", session_id=session_id)["waiting"]
        finally:
            pipe.close()
    finally:
        cpu_runner.stop()
        thread.join()
        cpu_runner.close()
    run_until_idle(install, devices=[device("cuda:1")])  # the GPU host is back
    assert status(install, session_id) == "completed"
    assert report()["waiting"] is None, "it waits no more"


# model affinity and two workers on real tiny models --------------------------------------------

@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from engine.domains.tinymodels import build_tiny_sd15, build_tiny_sdxl

    folder = tmp_path_factory.mktemp("models")
    build_tiny_sdxl(folder / "tiny")
    build_tiny_sd15(folder / "tiny15")
    return folder


def studio(folder, models, budget_gib: float = 0.0, **runner_settings) -> Installation:
    install = Installation(folder, settings={
        "handlers": {"modules": ["engine.domains", "tests.handlers"]},
        "batching": {"coalesce": False}, "models": {"cache_budget_gib": budget_gib}, "runner": runner_settings})
    registry = ModelRegistry(install.config.models_dir)
    registry.add(models / "tiny", "tiny")
    registry.add(models / "tiny15", "tiny15")
    return install


def result_images(install, session_id: str) -> list[str]:
    (row,) = query(install, "SELECT session_id, run, batch_id, item_index FROM sessions WHERE session_id = :s",
                   s=session_id)
    folder = Outbox(install.config.outbox).dir_of(dict(zip(("session_id", "run", "batch_id", "item_index"), row)))
    return json.loads((folder / "result.json").read_text())["images"]


def loads(install) -> list[str]:
    return [json.loads(row[0])["model_id"] for row in
            query(install, "SELECT data FROM events WHERE type = 'model.loaded' ORDER BY event_id")]


@pytest.mark.domains
def test_a_worker_takes_the_sessions_of_its_warm_model_first_and_loads_less(tmp_path, two_models):
    """Sessions alternate between two models and one model fits at a time: in strict queue order
    every session loads its model again; with affinity each model is loaded once."""
    job = {"workflow": "txt2img", "params": {"width": 64, "height": 64, "steps": 2, "prompt": "a boat"}}
    counts = {}
    for lookahead in (1, 32):
        # room for one model at a time: every switch of model is a load
        install = studio(tmp_path / f"look{lookahead}", two_models, budget_gib=1e-6, affinity_lookahead=lookahead)
        sessions = [submit(install, {**job, "params": {**job["params"], "model": ("tiny", "tiny15")[i % 2],
                                                       "seed": i}}).target_id for i in range(6)]
        run_until_idle(install)
        assert {status(install, s) for s in sessions} == {"completed"}
        counts[lookahead] = loads(install)
        install.store.close()
    assert counts[1] == ["tiny", "tiny15"] * 3
    assert counts[32] == ["tiny", "tiny15"]


@pytest.mark.domains
def test_two_cpu_workers_each_load_the_model_once_and_a_sigkill_loses_no_image(tmp_path, two_models):
    """The two-GPU run's shape on two CPU workers: a 12-item batch through one runner process whose
    [runner] devices names the CPU twice; each worker loads the model once (its own warm cache);
    the runner is killed with SIGKILL mid-run and started again: every item completes with its
    images exactly once."""
    install = studio(tmp_path / "engine", two_models, devices=["cpu", "cpu"], lease_seconds=2.0)
    batch = submit(install, {"kind": "batch", "workflow": "txt2img",
                             "params": {"width": 64, "height": 64, "steps": 4, "prompt": "a kite", "model": "tiny"},
                             "items": [{"seed": i} for i in range(12)],
                             "batch": {"preferred_batch_size": 1, "max_batch_size": 1}}).target_id

    def start():
        return subprocess.Popen([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], env=install.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=install.folder)

    first = start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        done = query(install, "SELECT count(*) FROM sessions WHERE batch_id = :b AND status = 'completed'", b=batch)
        if done[0][0] >= 3:
            break
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read().decode()
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = query(install, "SELECT count(*) FROM sessions WHERE batch_id = :b AND status = 'completed'", b=batch)[0][0]
    assert killed_at < 12, "the run ended before the kill: nothing was tested"
    second = start()
    output = second.communicate(timeout=300)[0].decode()
    assert second.returncode == 0, output
    sessions = [row[0] for row in query(install, "SELECT session_id FROM sessions WHERE batch_id = :b", b=batch)]
    assert {status(install, s) for s in sessions} == {"completed"}
    assert set(completions(install).values()) == {1}
    outbox = install.config.outbox
    images = [p for p in outbox.rglob("*.png") if ATTEMPTS not in p.parts and p.name != "contact-sheet.png"]
    assert len(images) == 12, images
    published = [name for s in sessions for name in result_images(install, s)]
    assert len(published) == 12 and all(name for name in published)
    # each runner process's workers loaded the model once each, into their own caches
    per_worker = Counter(row[0] for row in query(install, "SELECT stream_id FROM events WHERE type = 'model.loaded'"))
    assert set(per_worker.values()) == {1}, per_worker
    assert {key.split(":")[-2] for key in per_worker} == {"cpu#1", "cpu#2"}
    inference = Counter(c["worker"] for c in claims(install) if c["step_index"] == 2)
    assert set(inference) == {"cpu#1", "cpu#2"}, inference
    assert install.store.verify() == []


def test_a_live_runner_sweeps_away_the_attempt_folder_a_killed_runner_left(tmp_path):
    """A runner killed mid-step leaves its attempt folder; a runner that is already running (its
    start-up recovery long done) takes the step back and, on its sweep timer, removes the folder.
    The session is pinned to the CPU and the live runner offers only a stand-in GPU, so it is the
    killed runner that ran the step and the live one cannot run it again."""
    install = Installation(tmp_path / "engine", settings={"runner": {"lease_seconds": 1.0, "heartbeat_seconds": 0.2}})
    session_id = submit(install, {"workflow": "write1", "params": {"device": "cpu"}}).target_id
    attempts = install.config.outbox / ATTEMPTS
    live = install.engine.runner(devices=[device("cuda:1")])
    thread = threading.Thread(target=live.run)
    thread.start()
    try:
        env = {**install.env(), "ENGINE_TEST_WRITE_PAUSE": "60"}
        doomed = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet"], env=env, cwd=install.folder,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list(attempts.rglob("step-0.txt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(attempts.rglob("step-0.txt")), "the runner never started the step"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        deadline = time.monotonic() + 30
        while list(attempts.rglob("*.txt")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(attempts.rglob("*.txt")), "the killed runner's attempt folder was left behind"
        assert status(install, session_id) == "running"  # taken back, waiting for a CPU worker
    finally:
        live.stop()
        thread.join()
        live.close()
    run_until_idle(install, devices=[device("cpu")])
    assert status(install, session_id) == "completed"
    assert (install.config.outbox / session_id / "step-0.txt").read_text().endswith("done\n")
