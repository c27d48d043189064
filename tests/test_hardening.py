"""Hostile conditions, each with real runner processes: poison files, files that cannot be moved,
re-drops, two runners at one inbox, a database locked by another program, a full outbox disk, a
runner killed with SIGKILL, failures that will repeat. Nothing crashes the runner, nothing is lost.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Installation
from tests.helpers import event_types, query, submit

pytestmark = pytest.mark.slow


def job(**fields) -> bytes:
    return json.dumps({"workflow": "noop1", **fields}).encode()


def engine(install, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], env={**install.env(), **(env or {})},
                          cwd=install.folder, capture_output=True, text=True, timeout=timeout)


def run_until_idle(install, env: dict | None = None) -> subprocess.CompletedProcess:
    done = engine(install, "run", "--until-idle", "--quiet", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def watch(install, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet", *args], cwd=install.folder,
                            env={**install.env(), **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stderr.read().decode(errors="replace") if process.stderr else ""


def wait_for(predicate, seconds: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds}s"
        time.sleep(0.05)


def drop(inbox: Path, name: str, content: bytes) -> None:
    """As the README asks: write elsewhere, rename into the inbox."""
    tmp = inbox / f".{os.getpid()}-{time.monotonic_ns()}.tmp"
    tmp.write_bytes(content)
    os.replace(tmp, inbox / name)


def old(path: Path) -> None:
    """Make a file look finished long ago (past the partial-file grace)."""
    os.utime(path, (time.time() - 60, time.time() - 60))


def job_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".error.json")) if folder.is_dir() else []


HUGE_INT = b'{"workflow": "noop1", "params": {"seed": ' + b"9" * 5000 + b"}}"
NOT_UTF8_VALID = os.fsdecode(b"valid-\xff\xfe.json")
NOT_UTF8_GARBAGE = os.fsdecode(b"garbage-\xfe.json")


# 1, 2: poison files ------------------------------------------------------------------------------

def test_poison_files_at_start_are_rejected_and_the_runner_never_crash_loops(install):
    inbox = install.config.inbox
    (inbox / "huge-int.json").write_bytes(HUGE_INT)
    (inbox / NOT_UTF8_VALID).write_bytes(job(params={"prompt": "odd name"}))
    (inbox / NOT_UTF8_GARBAGE).write_bytes(b"{nope")
    (inbox / "good.json").write_bytes(job(params={"prompt": "good"}))
    for name in ("huge-int.json", NOT_UTF8_VALID, NOT_UTF8_GARBAGE, "good.json"):
        old(inbox / name)
    run_until_idle(install)
    run_until_idle(install)  # and again: no crash loop, nothing taken twice
    rejected, accepted = inbox / "rejected", inbox / "accepted"
    assert (rejected / "huge-int.json").read_bytes() == HUGE_INT
    error = json.loads((rejected / "huge-int.json.error.json").read_text())
    assert error["code"] == "VALIDATION_ERROR" and "4300 digits" in error["message"]
    # Names that are not UTF-8 are kept readable: each bad byte becomes a \xNN escape.
    assert (accepted / "valid-\\xff\\xfe.json").read_bytes() == job(params={"prompt": "odd name"})
    assert (rejected / "garbage-\\xfe.json").read_bytes() == b"{nope"
    assert json.loads((rejected / "garbage-\\xfe.json.error.json").read_text())["code"] == "VALIDATION_ERROR"
    assert query(install, "SELECT file_name, status FROM jobs ORDER BY file_name") == [
        ("garbage-\\xfe.json", "rejected"), ("good.json", "accepted"), ("huge-int.json", "rejected"),
        ("valid-\\xff\\xfe.json", "accepted")]
    assert query(install, "SELECT status, count(*) FROM sessions GROUP BY 1") == [("completed", 2)]
    assert [p.name for p in inbox.iterdir() if p.is_file()] == []


def test_poison_files_dropped_while_watching_never_hold_up_the_files_after_them(install):
    inbox = install.config.inbox
    runner = watch(install)
    try:
        drop(inbox, "huge-int.json", HUGE_INT)
        drop(inbox, NOT_UTF8_GARBAGE, b"\x00\x01 not json")
        os.symlink("/etc/passwd", inbox / "link.json")
        os.mkfifo(inbox / "fifo.json")
        for n in range(5):
            drop(inbox, f"after-{n}.json", job(params={"prompt": f"after {n}"}))
        wait_for(lambda: len(job_files(inbox / "accepted")) == 5, what="the five good files accepted")
        wait_for(lambda: len(job_files(inbox / "rejected")) == 4, what="the four bad files rejected")
        assert runner.poll() is None, "the runner died"
    finally:
        log = stop(runner)
    codes = {p.name: json.loads(p.read_text())["code"] for p in (inbox / "rejected").glob("*.error.json")}
    assert codes == {"huge-int.json.error.json": "VALIDATION_ERROR", "garbage-\\xfe.json.error.json": "VALIDATION_ERROR",
                     "link.json.error.json": "UNSAFE_PATH", "fifo.json.error.json": "VALIDATION_ERROR"}, log
    assert os.path.islink(inbox / "rejected" / "link.json"), "the link itself was moved, not what it points to"
    assert query(install, "SELECT count(*) FROM sessions") == [(5,)]


# 3: files that cannot be moved -------------------------------------------------------------------

def immutable(path: Path, on: bool) -> bool:
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_file_that_cannot_be_moved_is_recorded_as_stranded_and_skipped(install):
    inbox = install.config.inbox
    stuck, bad = inbox / "stuck.json", inbox / "stuck-bad.json"
    stuck.write_bytes(job(job_id="stuck-1", params={"prompt": "stuck"}))
    bad.write_bytes(b"{not json")
    (inbox / "free.json").write_bytes(job(params={"prompt": "free"}))
    for path in (stuck, bad, inbox / "free.json"):
        old(path)
    if not (immutable(stuck, True) and immutable(bad, True)):
        immutable(stuck, False)
        pytest.skip("chattr +i is not available here (needs root and a filesystem with the immutable flag)")
    try:
        run_until_idle(install)  # ends: a stranded file is not work left to do
        run_until_idle(install)  # skipped from then on: no second session, no second rejection
        assert stuck.exists() and bad.exists()
        rows = query(install, "SELECT file_name, status, move_error FROM jobs ORDER BY file_name")
        assert [(name, status) for name, status, _ in rows] == [
            ("free.json", "accepted"), ("stuck-bad.json", "rejected"), ("stuck.json", "accepted")]
        assert rows[0][2] is None and "could not be moved" in rows[1][2] and "could not be moved" in rows[2][2]
        assert query(install, "SELECT count(*) FROM event_log WHERE type = 'job.stranded'") == [(2,)]
        assert query(install, "SELECT status, count(*) FROM sessions GROUP BY 1") == [("completed", 2)]
        assert json.loads((inbox / "rejected" / "stuck-bad.json.error.json").read_text())["code"] == "VALIDATION_ERROR"
    finally:
        immutable(stuck, False)
        immutable(bad, False)
    run_until_idle(install)  # movable again: moved where its record says, still one session
    assert not stuck.exists() and (inbox / "accepted" / "stuck.json").exists()
    assert not bad.exists() and (inbox / "rejected" / "stuck-bad.json").read_bytes() == b"{not json"
    assert query(install, "SELECT count(*) FROM sessions") == [(2,)]


# 4: re-drops -------------------------------------------------------------------------------------

def test_the_same_file_dropped_again_after_it_ran_is_a_new_job(install):
    inbox = install.config.inbox
    content = job(params={"prompt": "again"})
    drop(inbox, "again.json", content)
    old(inbox / "again.json")
    run_until_idle(install)
    drop(inbox, "again.json", content)  # the same name and bytes, a new file
    old(inbox / "again.json")
    run_until_idle(install)
    os.rename(inbox / "accepted" / "again.json", inbox / "again.json")  # moved back in by hand
    old(inbox / "again.json")
    run_until_idle(install)
    assert query(install, "SELECT status, count(*) FROM sessions GROUP BY 1") == [("completed", 3)]
    assert query(install, "SELECT count(*) FROM jobs WHERE status = 'accepted'") == [(3,)]
    assert len(job_files(inbox / "accepted")) == 2  # the one moved back went back to its name
    assert all((inbox / "accepted" / name).read_bytes() == content for name in job_files(inbox / "accepted"))
    assert job_files(inbox / "rejected") == []


# 5: two runners at one inbox ---------------------------------------------------------------------

def test_two_runners_watching_one_inbox_take_each_file_exactly_once(backend_install):
    install = backend_install
    inbox = install.config.inbox
    runners = [watch(install, "--runner-id", f"racer-{n}") for n in range(2)]
    names = [f"race-{n:03d}.json" for n in range(120)]
    try:
        time.sleep(1.0)  # both are watching
        for n, name in enumerate(names):
            fields = {"job_id": f"race-job-{n}"} if n % 2 else {}
            drop(inbox, name, job(params={"prompt": f"race {n}"}, **fields))
        wait_for(lambda: job_files(inbox / "accepted") == names, 90, "every file accepted")
        wait_for(lambda: query(install, "SELECT count(*) FROM sessions WHERE status = 'completed'") == [(120,)], 90,
                 "every session completed")
        assert all(r.poll() is None for r in runners), "a runner died"
    finally:
        logs = [stop(r) for r in runners]
    assert job_files(inbox / "rejected") == [], logs
    assert query(install, "SELECT count(*) FROM event_log WHERE type = 'job.rejected'") == [(0,)]
    assert query(install, "SELECT count(*), count(DISTINCT file_name) FROM jobs") == [(120, 120)]
    assert query(install, "SELECT count(*) FROM sessions") == [(120,)]


# 6: a database locked by another program ---------------------------------------------------------

def test_a_runner_waits_out_another_program_holding_the_write_lock(tmp_path):
    install = Installation(tmp_path / "engine", settings={"database": {"busy_timeout_ms": 200}})
    inbox = install.config.inbox
    runner = watch(install)
    holder = sqlite3.connect(install.config.path("database"), isolation_level=None)
    reader = sqlite3.connect(install.config.path("database"), isolation_level=None)
    try:
        drop(inbox, "before.json", job(job_id="before"))
        wait_for(lambda: query(install, "SELECT status FROM sessions WHERE job_id = 'before'") == [("completed",)])
        reader.execute("BEGIN")  # a long reader, open for the whole test: it never stalls the runner (WAL)
        reader.execute("SELECT count(*) FROM events").fetchall()
        holder.execute("BEGIN IMMEDIATE")  # another program takes the write lock for far longer than busy_timeout
        drop(inbox, "during.json", job(job_id="during"))
        cancel = subprocess.Popen([sys.executable, "-m", "engine", "cancel", "before", "--yes"], env=install.env(),
                                  cwd=install.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(3.0)
        assert runner.poll() is None, "the runner died of 'database is locked'"
        assert cancel.poll() is None, "the CLI gave up instead of waiting for the lock"
        holder.execute("COMMIT")
        wait_for(lambda: query(install, "SELECT status FROM sessions WHERE job_id = 'during'") == [("completed",)])
        assert cancel.wait(timeout=30) == 4, cancel.stdout.read()  # a completed session: INVALID_TRANSITION
        assert runner.poll() is None
    finally:
        reader.close()
        holder.close()
        log = stop(runner)
    assert "waiting for it" in log and "got the database write lock" in log, log


# 7: the outbox's disk full -----------------------------------------------------------------------

@pytest.fixture
def small_outbox(tmp_path):
    install = Installation(tmp_path / "engine", settings={"runner": {"max_attempts": 2}})
    outbox = install.config.outbox
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(outbox)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield install
    finally:
        subprocess.run(["umount", "-l", str(outbox)], capture_output=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_a_full_outbox_fails_the_step_clearly_and_everything_is_written_once_space_returns(small_outbox):
    install = small_outbox
    outbox = install.config.outbox
    filler = fill(outbox)
    runner = watch(install)
    try:
        drop(install.config.inbox, "full.json", json.dumps({"workflow": "write1", "job_id": "full"}).encode())
        wait_for(lambda: query(install, "SELECT status FROM sessions WHERE job_id = 'full'") == [("failed",)],
                 what="the session failing")
        (session_id, message), = query(install, "SELECT session_id, error_message FROM sessions WHERE job_id = 'full'")
        assert "No space left on device" in message, message
        assert event_types(install, session_id).count("step.retried") == 1, "an I/O error is retried"
        assert not (outbox / session_id / "result.json").exists()
        assert [p for p in outbox.rglob("*") if p.name.endswith(".tmp")] == [], "a temporary file was left"
        filler.unlink()  # space is back: the running runner writes what it owes
        wait_for(lambda: (outbox / session_id / "result.json").exists(), what="result.json written once space returned")
        assert json.loads((outbox / session_id / "result.json").read_text())["status"] == "failed"
        restarted = engine(install, "restart", "full")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        wait_for(lambda: query(install, "SELECT status FROM sessions WHERE job_id = 'full'") == [("completed",)])
        wait_for(lambda: (outbox / session_id / "run-2" / "result.json").exists())
        assert (outbox / session_id / "run-2" / "step-0.txt").read_text().endswith("done\n")
        assert runner.poll() is None
    finally:
        stop(runner)
    assert [p for p in outbox.rglob("*") if p.name.endswith(".tmp")] == []


# 8: a runner killed with SIGKILL -----------------------------------------------------------------

def test_a_killed_runner_is_noticed_at_once_on_its_host(tmp_path):
    install = Installation(tmp_path / "engine", settings={"runner": {"lease_seconds": 120.0}})
    session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 40}}).target_id  # a 4 s step
    first = watch(install, "--runner-id", "doomed")
    wait_for(lambda: query(install, "SELECT count(*) FROM leases WHERE session_id = :id AND step_index = 1",
                           id=session_id) == [(1,)], what="the sleep step running")
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    shown = engine(install, "session", session_id, "--json")
    report = json.loads(shown.stdout)
    assert report["steps"][1]["status"] == "waiting for a runner", report
    assert "waits for a runner" in engine(install, "session", session_id).stdout
    assert query(install, "SELECT status FROM runner_status WHERE runner_id = 'doomed'") == [("running",)]
    listed = {r["runner_id"]: r["status"] for r in json.loads(engine(install, "runners", "--json").stdout)}
    assert listed["doomed"] == "gone", "engine runners says what engine session says"
    started = time.monotonic()
    run_until_idle(install)  # another runner on this host: takes the step back at once, not after 120 s
    assert time.monotonic() - started < 60
    assert query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session_id) == [("completed",)]
    retried = [e.data for e in install.store.stream("session", session_id) if e.type == "step.retried"]
    assert [r["message"] for r in retried] == ["the runner holding this step is gone"]
    assert query(install, "SELECT status FROM runner_status WHERE runner_id = 'doomed'") == [("gone",)]


# 9: failures that will repeat --------------------------------------------------------------------

def test_an_error_that_will_repeat_fails_at_once_and_a_transient_one_is_retried(install):
    buggy = submit(install, {"workflow": "buggy"}).target_id
    flaky = submit(install, {"workflow": "flaky", "params": {"seed": 2}}).target_id
    run_until_idle(install)
    assert query(install, "SELECT status, attempts, error_message FROM steps WHERE session_id = :id", id=buggy) == [
        ("failed", 1, "TypeError: argument of type 'NoneType' is not iterable (not retried: it would fail the "
                      "same way)")]
    assert query(install, "SELECT status, attempts FROM steps WHERE session_id = :id", id=flaky)[-1] == ("completed", 3)


def test_run_until_idle_ends_while_the_outbox_is_full_and_the_next_start_writes_what_is_owed(small_outbox):
    install = small_outbox
    outbox = install.config.outbox
    filler = fill(outbox)
    session_id = submit(install, {"workflow": "write1"}).target_id
    run_until_idle(install)  # ends: the step failed (no space), and result.json is owed
    assert query(install, "SELECT status FROM sessions WHERE session_id = :id", id=session_id) == [("failed",)]
    assert not (outbox / session_id / "result.json").exists()
    filler.unlink()
    run_until_idle(install)  # recovery at start writes it
    assert json.loads((outbox / session_id / "result.json").read_text())["status"] == "failed"
    assert [p for p in outbox.rglob("*") if p.name.endswith(".tmp")] == []
