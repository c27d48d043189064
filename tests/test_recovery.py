"""Crash recovery with real processes: the runner is a subprocess, killed with SIGKILL at random
instants (claiming, inside a handler, after a handler before its completion commits), then started
again. Nothing is lost, nothing runs twice, nothing is left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from engine.outbox.folders import ATTEMPTS
from tests.conftest import Installation
from tests.helpers import completions, query, submit

KILL_POINTS = int(os.environ.get("ENGINE_TEST_KILL_POINTS", "20"))


def start_runner(install, runner_id="runner-under-test", pause="0.03"):
    env = install.env()
    env["ENGINE_TEST_WRITE_PAUSE"] = pause
    env["ENGINE_RUNNER_LEASE_SECONDS"] = "1.0"
    env["ENGINE_RUNNER_HEARTBEAT_SECONDS"] = "0.2"
    # Every kill counts an attempt for the step in flight, and a restarted runner takes that step
    # first: kills landing early in a few lives in a row could exhaust the default 3 attempts and
    # fail a session, as designed. This test is about loss and duplication, so attempts never run out.
    env["ENGINE_RUNNER_MAX_ATTEMPTS"] = "1000"
    return subprocess.Popen([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet", "--runner-id", runner_id],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=install.folder)


def assert_everything_done_once(install, session_ids, steps_per_session=3):
    assert query(install, "SELECT DISTINCT status FROM sessions") == [("completed",)]
    counts = completions(install)
    assert len(counts) == len(session_ids) * steps_per_session
    assert set(counts.values()) == {1}, "a completed step ran to completion twice"
    outbox = install.config.outbox
    for session_id in session_ids:
        folder = outbox / session_id
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["result.json"] + [f"step-{i}.txt" for i in range(steps_per_session)], names
        result = json.loads((folder / "result.json").read_text())
        assert result["status"] == "completed"
        for step in result["steps"]:
            text = (folder / f"step-{step['index']}.txt").read_text()
            assert text.endswith("done\n"), "a file from an attempt that never committed was published"
            assert f"attempt {step['attempts']}" in text, "the published file is not the committed attempt's"
    leftovers = list((outbox / ATTEMPTS).rglob("*")) if (outbox / ATTEMPTS).exists() else []
    assert leftovers == [], leftovers
    assert [p for p in outbox.rglob("*") if p.name.endswith(".tmp")] == []
    assert install.store.verify() == []


@pytest.mark.slow
def test_sigkill_at_random_instants_loses_nothing_and_repeats_nothing(tmp_path):
    install = Installation(tmp_path / "engine")
    session_ids = [submit(install, {"workflow": "files3"}).target_id for _ in range(100)]
    rng = random.Random(int(os.environ.get("ENGINE_TEST_SEED", "0")) or None)
    kills = 0
    while kills < KILL_POINTS:
        process = start_runner(install)
        time.sleep(rng.uniform(0.3, 1.2))  # start-up takes about half a second: kills land all over
        if process.poll() is not None:
            break  # it finished all the work before this kill point
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    final = start_runner(install)
    output, _ = final.communicate(timeout=120)
    assert final.returncode == 0, output.decode()
    assert kills == KILL_POINTS, f"only {kills} kills landed before the work ran out"
    assert_everything_done_once(install, session_ids)


@pytest.mark.slow
def test_a_kill_between_commit_and_publish_is_finished_at_start(tmp_path):
    """The narrowest window, made wide: the runner is killed after step.completed committed but
    before the files were renamed; the next start publishes them without running the step again."""
    install = Installation(tmp_path / "engine")
    session_id = submit(install, {"workflow": "files3"}).target_id
    env = install.env()
    code = (
        "import os, signal\n"
        "from engine.config import load_config\n"
        "from engine import app\n"
        "from engine.outbox.folders import Outbox\n"
        "Outbox.publish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "cfg = load_config()\n"
        "app.Engine.create(cfg).runner(runner_id='r1').run(until_idle=True)\n"
    )
    crashed = subprocess.run([sys.executable, "-c", code], env=env, cwd=install.folder, capture_output=True)
    assert crashed.returncode == -signal.SIGKILL
    assert query(install, "SELECT status FROM step_status WHERE step_index = 0") == [("completed",)]
    assert any((install.config.outbox / ATTEMPTS / session_id).iterdir())
    final = start_runner(install, runner_id="r1", pause="0")
    output, _ = final.communicate(timeout=60)
    assert final.returncode == 0, output.decode()
    assert_everything_done_once(install, [session_id])


def test_a_sweep_between_the_two_mkdirs_of_a_work_folder_does_not_fail_the_step(tmp_path, monkeypatch):
    """A step's work folder is made with its parent, the session's folder under .attempts, which
    a sweep (or the discard of the session's previous step, published while this one starts)
    removes whenever it is empty. A real sweep forced into the instant between the two mkdirs
    used to fail the step with ENOENT, classified as a missing file: not retried."""
    from engine.outbox.folders import make_empty
    from engine.run.recovery import sweep_attempts

    install = Installation(tmp_path / "engine")
    folder = install.engine.outbox.attempt_dir("ses-raced", 1, 0, 1)
    real_mkdir, swept = os.mkdir, []

    def mkdir_then_sweep(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if os.fspath(path) == os.fspath(folder.parent) and not swept:
            sweep_attempts(install.engine.store, install.engine.outbox)
            swept.append(folder.parent.exists())

    monkeypatch.setattr(os, "mkdir", mkdir_then_sweep)
    assert make_empty(folder).is_dir()
    assert swept == [False]  # the sweep ran in the window and removed the session's empty folder
    install.engine.close()
