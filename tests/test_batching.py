"""Group claims: compatible steps share one handler call, sized by the batch's configuration or
the coalescing defaults; priority decides who leads; a crash at any instant loses nothing and
publishes nothing twice. Uses the test handler `write_group` (compatible when params.steps match)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from engine.run.grouping import call_limit, take_partners
from engine.outbox.folders import ATTEMPTS, Outbox
from tests.conftest import Installation
from tests.helpers import completions, query, run_until_idle, submit


def folder_of(install, session_id: str):
    (run, batch_id, item_index), = query(install, "SELECT run, batch_id, item_index FROM sessions "
                                                  "WHERE session_id = :id", id=session_id)
    return Outbox(install.config.outbox).session_dir(session_id, run, batch_id, item_index)


def calls(install, session_ids) -> Counter:
    """call id -> how many of these sessions' steps it served, from result.json."""
    counted: Counter = Counter()
    for session_id in session_ids:
        result = json.loads((folder_of(install, session_id) / "result.json").read_text())
        counted[result["steps"][1]["data"]["call_id"]] += 1
    return counted


def batch_items(install, batch_id) -> list[str]:
    return [row[0] for row in query(install, "SELECT session_id FROM items WHERE batch_id = :b ORDER BY item_index",
                                    b=batch_id)]


def test_the_rules_are_pure_functions():
    assert call_limit({"preferred_batch_size": 4, "max_batch_size": 8}, {"max_batch_size": 8}) == 4
    assert call_limit({"preferred_batch_size": 16, "max_batch_size": 8}, {}) == 8, "never above max"
    assert call_limit(None, {"max_batch_size": 6}) == 6
    assert take_partners(8, 2, [("a", 4), ("b", 4), ("c", 2)]) == ["a", "c"], "too big for the room: passed over"
    assert take_partners(4, 4, [("a", 1)]) == []


def test_a_batch_of_8_with_preferred_size_4_runs_in_2_calls(backend_install):
    install = backend_install
    batch = submit(install, {"kind": "batch", "workflow": "grouped", "params": {"steps": 5},
                             "items": [{"prompt": f"item {n}"} for n in range(8)],
                             "batch": {"preferred_batch_size": 4, "max_batch_size": 8}}).target_id
    run_until_idle(install)
    assert sorted(calls(install, batch_items(install, batch)).values()) == [4, 4]
    assert query(install, "SELECT status, completed_items FROM batches") == [("completed", 8)]
    (total, completed, images, average, remaining, rate), = query(
        install, "SELECT total_batches, completed_batches, total_images_generated, average_batch_time, "
                 "estimated_time_remaining, images_per_second FROM batch_status")
    assert (total, completed, images, remaining) == (2, 2, 0, 0)  # write_group makes files, not images
    assert average > 0 and rate == 0
    assert install.store.verify() == []


def test_the_next_call_starts_while_the_last_calls_files_are_written(install):
    """A handler that returns with its files still being written (as inference's PNGs are) does
    not hold up the device: the next group is claimed and started first, and the step is recorded
    once its files are written."""
    batch = submit(install, {"kind": "batch", "workflow": "grouped-late", "params": {"steps": 5},
                             "items": [{"prompt": f"item {n}"} for n in range(6)],
                             "batch": {"preferred_batch_size": 2, "max_batch_size": 2}}).target_id
    run_until_idle(install)
    sessions = batch_items(install, batch)
    assert sorted(calls(install, sessions).values()) == [2, 2, 2]
    by_call: dict[str, list[bool]] = {}
    for session_id in sessions:
        text = (folder_of(install, session_id) / "step-1.txt").read_text()
        by_call.setdefault(text.split(" call ")[1].split()[0], []).append(text.strip().endswith("True"))
    overlapped = sorted(all(flags) for flags in by_call.values())
    assert overlapped == [False, True, True], "each call but the last started the next before its files"
    assert query(install, "SELECT status, completed_items FROM batches") == [("completed", 6)]
    assert install.store.verify() == []


def test_compatible_single_sessions_coalesce_and_incompatible_ones_never_do(tmp_path):
    on = Installation(tmp_path / "on", settings={"batching": {"coalesce": True, "max_batch_size": 8}})
    off = Installation(tmp_path / "off", settings={"batching": {"coalesce": False, "max_batch_size": 8}})
    for install in (on, off):
        install.alike = [submit(install, {"workflow": "grouped", "params": {"steps": 5, "prompt": f"p{n}"}}).target_id
                         for n in range(6)]
        install.other = [submit(install, {"workflow": "grouped", "params": {"steps": 7}}).target_id for _ in range(2)]
        run_until_idle(install)
    assert sorted(calls(on, on.alike).values()) == [6], "six compatible singles share one call"
    assert sorted(calls(on, on.other).values()) == [2]
    assert not set(calls(on, on.alike)) & set(calls(on, on.other)), "incompatible sessions never share a call"
    assert sorted(calls(off, off.alike).values()) == [1] * 6, "coalescing off: one call each"
    for install in (on, off):
        install.store.close()


def test_the_highest_priority_step_leads_and_a_big_batch_never_starves_an_urgent_session(install):
    batch = submit(install, {"kind": "batch", "workflow": "grouped", "priority": 1, "params": {"steps": 5},
                             "items": [{} for _ in range(12)], "batch": {"preferred_batch_size": 4}}).target_id
    urgent = submit(install, {"workflow": "grouped", "priority": 9, "params": {"steps": 9}}).target_id
    joiner = submit(install, {"workflow": "grouped", "priority": 2, "params": {"steps": 5}}).target_id
    run_until_idle(install)
    claimed = [data["session_id"] for data in (json.loads(row[0]) for row in query(
        install, "SELECT data FROM event_log WHERE type = 'step.claimed' ORDER BY event_id")) if data["step_index"] == 1]
    assert claimed[0] == urgent, "the urgent session's step led the first call"
    assert calls(install, [urgent]).most_common(1)[0][1] == 1
    assert claimed.index(joiner) == 1, "priority 2 runs before the priority 1 batch"
    # A batch's items share calls only with each other, as its preferred size says: no single joins them.
    assert sorted(calls(install, batch_items(install, batch)).values()) == [4, 4, 4]
    assert not set(calls(install, [joiner])) & set(calls(install, batch_items(install, batch)))


KILL_POINTS = int(os.environ.get("ENGINE_TEST_GROUP_KILL_POINTS", "10"))


@pytest.mark.slow
def test_sigkill_during_batched_calls_loses_nothing_and_publishes_nothing_twice(tmp_path):
    install = Installation(tmp_path / "engine", settings={"batching": {"max_batch_size": 4}})
    session_ids = [submit(install, {"workflow": "grouped", "params": {"steps": 5, "prompt": f"p{n}"}}).target_id
                   for n in range(200)]
    env = {**install.env(), "ENGINE_TEST_WRITE_PAUSE": "0.2", "ENGINE_RUNNER_LEASE_SECONDS": "1.0",
           "ENGINE_RUNNER_HEARTBEAT_SECONDS": "0.2", "ENGINE_RUNNER_MAX_ATTEMPTS": "1000"}
    rng = random.Random(int(os.environ.get("ENGINE_TEST_SEED", "0")) or None)
    kills = 0
    while kills < KILL_POINTS:
        process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet", "--runner-id",
                                    "grouper"], env=env, cwd=install.folder, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.2))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    final = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet", "--runner-id", "grouper"],
                           env=env, cwd=install.folder, capture_output=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert kills == KILL_POINTS, f"only {kills} kills landed before the work ran out"
    assert query(install, "SELECT DISTINCT status FROM sessions") == [("completed",)]
    assert set(completions(install).values()) == {1} and len(completions(install)) == 2 * len(session_ids)
    sizes = calls(install, session_ids)
    assert max(sizes.values()) <= 4 and sum(sizes.values()) == 200
    for session_id in session_ids:
        folder = install.config.outbox / session_id
        assert sorted(p.name for p in folder.iterdir()) == ["result.json", "step-1.txt"]
        result = json.loads((folder / "result.json").read_text())
        step = result["steps"][1]
        text = (folder / "step-1.txt").read_text()
        assert f"attempt {step['attempts']} call {step['data']['call_id']}" in text, "not the committed attempt's file"
    outbox = install.config.outbox
    assert not (outbox / ATTEMPTS).exists() or list((outbox / ATTEMPTS).rglob("*")) == []
    assert install.store.verify() == []


def test_a_matrix_expands_params_as_a_product_or_a_zip_with_a_cap(tmp_path):

    install = Installation(tmp_path / "engine", settings={"inbox": {"max_batch_items": 12}})
    inbox = install.config.inbox
    jobs = {
        "product.json": {"kind": "batch", "workflow": "grouped", "params": {"steps": 5},
                         "matrix": {"product": {"prompt": ["fox", "owl"], "seed": [1, 2, 3]}}},
        "zip.json": {"kind": "batch", "workflow": "grouped", "matrix": {"zip": {"prompt": ["a", "b"], "steps": [5, 6]}}},
        "uneven.json": {"kind": "batch", "workflow": "grouped", "matrix": {"zip": {"prompt": ["a", "b"], "seed": [1]}}},
        "too-many.json": {"kind": "batch", "workflow": "grouped",
                          "Matrix": {"Product": {"prompt": list("abcd"), "seed": [1, 2, 3, 4]}}},
        "nothing.json": {"kind": "batch", "workflow": "grouped"},
    }
    for name, job in jobs.items():
        (inbox / name).write_text(json.dumps(job))
        os.utime(inbox / name, (0, 0))
    outcomes = {o.file_name: o for o in install.engine.inbox().scan()}
    assert outcomes["product.json"].accepted and outcomes["zip.json"].accepted
    assert outcomes["uneven.json"].code == "VALIDATION_ERROR" and "equal" in outcomes["uneven.json"].message
    assert outcomes["too-many.json"].code == "VALIDATION_ERROR" and "16 items, at most 12" in outcomes["too-many.json"].message
    assert outcomes["nothing.json"].code == "VALIDATION_ERROR"
    items = query(install, "SELECT s.params FROM sessions s JOIN items i ON i.session_id = s.session_id "
                           "WHERE i.batch_id = :b ORDER BY i.item_index", b=outcomes["product.json"].target_id)
    assert [(json.loads(p)["prompt"], json.loads(p)["seed"]) for p, in items] == [
        ("fox", 1), ("fox", 2), ("fox", 3), ("owl", 1), ("owl", 2), ("owl", 3)]
    install.store.close()


def test_dynamic_sizing_sizes_calls_from_the_memory_measured_for_the_model(backend_install):
    """A measured profile (100 bytes an image, 1000 available) is kept in the store; a batch with
    dynamic_sizing then makes as many images a call as fit under its memory_threshold (0.5: five),
    never more than max_batch_size; without dynamic_sizing its preferred size rules."""
    install = backend_install
    fake = {"model": "fake-model", "steps": 5}
    submit(install, {"workflow": "grouped-measured", "params": fake})
    run_until_idle(install)
    assert query(install, "SELECT model_id, per_image_bytes, available_bytes FROM memory_profiles") == [
        ("fake-model", 100, 1000)]
    batches = {}
    for dynamic, maximum in ((True, 8), (True, 4), (False, 8)):
        batches[(dynamic, maximum)] = submit(install, {
            "kind": "batch", "workflow": "grouped-measured", "params": fake, "items": [{} for _ in range(8)],
            "batch": {"preferred_batch_size": 2, "max_batch_size": maximum, "dynamic_sizing": dynamic,
                      "memory_threshold": 0.5}}).target_id
        run_until_idle(install)
    sizes = {key: sorted(calls(install, batch_items(install, batch)).values(), reverse=True)
             for key, batch in batches.items()}
    assert sizes == {(True, 8): [5, 3], (True, 4): [4, 4], (False, 8): [2, 2, 2, 2]}
    assert install.store.verify() == [], "the profile is a projection of model.measured events"
