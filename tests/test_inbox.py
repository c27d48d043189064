"""The inbox against an adversarial corpus, with a real runner process watching a real folder.

Each bad file must be refused with the right contract code, kept byte for byte in rejected/ with
an error.json beside it, and the runner must stay alive and keep taking good files.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from engine import commands
from tests.conftest import Installation
from tests.helpers import query

SETTINGS = {"limits": {"max_size": 2048}, "inbox": {"max_file_bytes": 65536, "max_batch_items": 50}}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be huge: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 64)
    body += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + body + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def job(**fields) -> bytes:
    return json.dumps({"workflow": "noop1", **fields}).encode()


def upscale(image: str) -> bytes:
    return json.dumps({"workflow": "upscale", "params": {"init_image": image}}).encode()


def deep(levels: int) -> bytes:
    return ('{"workflow": "noop1", "params": {"prompt": ' + "[" * levels + "]" * levels + "}}").encode()


CASES = [
    # (name, content, expected code or "accepted")
    ("invalid-json.json", b'{"workflow": "noop1",, }', "VALIDATION_ERROR"),
    ("truncated.json", b'{"workflow": "noop1", "params": {"prompt": "a li', "VALIDATION_ERROR"),
    ("empty.json", b"", "VALIDATION_ERROR"),
    ("only-whitespace.json", b"  \n\t ", "VALIDATION_ERROR"),
    ("bom.json", b"\xef\xbb\xbf" + job(), "accepted"),
    ("deep-nesting.json", deep(100_000), "VALIDATION_ERROR"),
    ("wrong-type.json", job(params={"steps": "thirty"}), "VALIDATION_ERROR"),
    ("huge-number.json", job(params={"seed": 10**40}), "VALIDATION_ERROR"),
    ("huge-float.json", b'{"workflow": "noop1", "params": {"guidance_scale": 1e999}}', "VALIDATION_ERROR"),
    ("nan.json", b'{"workflow": "noop1", "params": {"guidance_scale": NaN}}', "VALIDATION_ERROR"),
    ("negative-width.json", job(params={"width": -64}), "VALIDATION_ERROR"),
    ("odd-width.json", job(params={"width": 100}), "VALIDATION_ERROR"),
    ("too-wide.json", job(params={"width": 4096}), "VALIDATION_ERROR"),
    ("zero-steps.json", job(params={"steps": 0}), "VALIDATION_ERROR"),
    ("unknown-key.json", job(colour="blue"), "VALIDATION_ERROR"),
    ("array-root.json", b"[1, 2, 3]", "VALIDATION_ERROR"),
    ("bad-kind.json", job(kind="bogus"), "VALIDATION_ERROR"),
    ("unknown-scheduler.json", job(params={"scheduler": "magic"}), "VALIDATION_ERROR"),
    ("unknown-op.json", job(params={"postprocess": [{"op": "sparkle"}]}), "VALIDATION_ERROR"),
    ("two-spellings.json", job(params={"guidance_scale": 5, "guidanceScale": 6}), "VALIDATION_ERROR"),
    ("not-utf8.json", b'{"workflow": "noop1", "params": {"prompt": "\xff\xfe"}}', "VALIDATION_ERROR"),
    ("too-big.json", job(params={"prompt": "x" * 19000}) + b" " * 70000, "VALIDATION_ERROR"),
    ("unknown-workflow.json", json.dumps({"workflow": "txt3img"}).encode(), "UNKNOWN_WORKFLOW"),
    ("unknown-model.json", json.dumps({"workflow": "txt2img", "params": {"model": "nope"}}).encode(), "UNKNOWN_MODEL"),
    ("unknown-upscaler.json", json.dumps({"workflow": "upscale", "params": {
        "init_image": "images/ok.png", "postprocess": [{"op": "upscale", "model": "nope"}]}}).encode(), "UNKNOWN_MODEL"),
    ("absolute-path.json", upscale("/etc/passwd"), "UNSAFE_PATH"),
    ("windows-path.json", upscale("C:\\Windows\\win.ini"), "UNSAFE_PATH"),
    ("dotdot.json", upscale("images/../../secret.png"), "UNSAFE_PATH"),
    ("symlink-out.json", upscale("images/escape.png"), "UNSAFE_PATH"),
    ("missing-image.json", upscale("images/none.png"), "VALIDATION_ERROR"),
    ("text-as-png.json", upscale("images/fake.png"), "VALIDATION_ERROR"),
    ("decompression-bomb.json", upscale("images/bomb.png"), "VALIDATION_ERROR"),
    ("batch-no-items.json", json.dumps({"kind": "batch", "workflow": "noop1", "items": []}).encode(), "VALIDATION_ERROR"),
    ("batch-too-many.json", json.dumps({"kind": "batch", "workflow": "noop1", "items": [{}] * 51}).encode(),
     "VALIDATION_ERROR"),
    ("batch-bad-item.json", json.dumps({"kind": "batch", "workflow": "noop1",
                                        "items": [{}, {"steps": -1}]}).encode(), "VALIDATION_ERROR"),
    ("control-unknown.json", json.dumps({"kind": "control", "target": "ses-nope", "action": "cancel"}).encode(),
     "NOT_FOUND"),
    ("control-bad-action.json", json.dumps({"kind": "control", "target": "x", "action": "explode"}).encode(),
     "VALIDATION_ERROR"),
    ("unicode-ジョブ-✓.json", job(params={"prompt": "灯台 🌅"}), "accepted"),
    ("x" * 230 + ".json", b"{oops", "VALIDATION_ERROR"),
    ("camel-and-pascal.json", json.dumps({"Workflow": "noop1", "Priority": 7,
                                          "Params": {"GuidanceScale": 4.5, "numImages": 1}}).encode(), "accepted"),
    ("good-upscale.json", upscale("images/ok.png"), "accepted"),
]


class Watched:
    """A runner process watching an installation's inbox."""

    def __init__(self, folder: Path) -> None:
        self.install = Installation(folder, settings=SETTINGS)
        self.process = None
        self.good = 0

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet"], env=self.install.env(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.install.folder)

    def drop(self, name: str, content: bytes) -> Path:
        inbox = self.install.config.inbox
        tmp = inbox / ".incoming.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, inbox / name)
        return inbox / name

    def wait_taken(self, name: str, seconds: float = 15.0) -> str:
        inbox = self.install.config.inbox
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not (inbox / name).exists():
                return "accepted" if (inbox / "accepted" / name).exists() else "rejected"
            time.sleep(0.02)
        raise AssertionError(f"{name} was not taken within {seconds}s")

    def alive_and_taking(self) -> None:
        assert self.process.poll() is None, "the runner died"
        self.good += 1
        name = f"good-{self.good}.json"
        self.drop(name, job(params={"prompt": f"good {self.good}"}))
        assert self.wait_taken(name) == "accepted"


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    runner = Watched(tmp_path_factory.mktemp("inbox") / "engine")
    images = runner.install.config.inbox / "images"
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(images / "ok.png")
    (images / "fake.png").write_text("I am not a PNG")
    (images / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    outside = runner.install.folder.parent / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (images / "escape.png").symlink_to(outside)
    runner.start()
    yield runner
    runner.process.send_signal(signal.SIGTERM)
    try:
        runner.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        runner.process.kill()


@pytest.mark.parametrize("name,content,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_adversarial_inbox_file(watched, name, content, expected):
    watched.drop(name, content)
    outcome = watched.wait_taken(name)
    inbox = watched.install.config.inbox
    if expected == "accepted":
        assert outcome == "accepted", (inbox / "rejected" / f"{name}.error.json").read_text()
        assert (inbox / "accepted" / name).read_bytes() == content
    else:
        assert outcome == "rejected"
        kept = inbox / "rejected" / name if len(name.encode()) <= 200 else None
        if kept is None:
            kept = next(p for p in (inbox / "rejected").iterdir() if p.name.startswith("x" * 100)
                        and not p.name.endswith(".error.json"))
        assert kept.read_bytes() == content, "the original file is preserved as it was"
        error = json.loads(kept.with_name(kept.name + ".error.json").read_text())
        assert error["code"] == expected, error
        assert error["message"]
    watched.alive_and_taking()


def test_files_being_written_are_not_taken_until_complete(watched):
    inbox = watched.install.config.inbox
    for name in (".hidden.json", "draft.json.swp", "draft.json~", "upload.json.tmp", "notes.txt"):
        (inbox / name).write_text("{")
    partial = inbox / "slow-writer.json"
    with open(partial, "w") as handle:
        handle.write('{"workflow": "noop1", ')
        handle.flush()
        time.sleep(0.3)
        assert partial.exists(), "a file still being written was taken"
        handle.write('"params": {"prompt": "slow"}}')
    assert watched.wait_taken("slow-writer.json") == "accepted"
    for name in (".hidden.json", "draft.json.swp", "draft.json~", "upload.json.tmp", "notes.txt"):
        assert (inbox / name).exists(), f"{name} must not be taken"


def test_a_repeated_job_id_is_refused_pointing_at_the_first(watched):
    first = watched.drop("first.json", job(job_id="client-42"))
    assert watched.wait_taken(first.name) == "accepted"
    watched.drop("second.json", job(job_id="client-42", priority=9))
    assert watched.wait_taken("second.json") == "rejected"
    error = json.loads((watched.install.config.inbox / "rejected" / "second.json.error.json").read_text())
    session_id = query(watched.install, "SELECT session_id FROM sessions WHERE job_id = 'client-42'")[0][0]
    assert error["code"] == "DUPLICATE_JOB" and error["existing_id"] == session_id


def test_an_invalid_transition_by_control_file_is_refused_and_changes_nothing(watched):
    install = watched.install
    done = watched.drop("to-finish.json", job(job_id="finish-me"))
    assert watched.wait_taken(done.name) == "accepted"
    deadline = time.monotonic() + 15
    while query(install, "SELECT status FROM sessions WHERE job_id = 'finish-me'") != [("completed",)]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    watched.drop("pause-it.json", json.dumps({"kind": "control", "target": "finish-me", "action": "pause"}).encode())
    assert watched.wait_taken("pause-it.json") == "rejected"
    error = json.loads((install.config.inbox / "rejected" / "pause-it.json.error.json").read_text())
    assert error["code"] == "INVALID_TRANSITION" and error["current_state"] == "completed"
    assert query(install, "SELECT status FROM sessions WHERE job_id = 'finish-me'") == [("completed",)]


@pytest.mark.slow
def test_sigkill_during_the_ingest_of_500_files_takes_each_exactly_once(tmp_path):
    install = Installation(tmp_path / "engine")
    inbox = install.config.inbox
    for n in range(500):
        (inbox / f"job-{n:03d}.json").write_bytes(job(params={"prompt": f"picture {n}"}))
    kills = 0
    for delay in (0.7, 0.9, 1.1, 1.3, 1.6):
        process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet", "--runner-id", "r"],
                                   env=install.env(), cwd=install.folder, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    final = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet", "--runner-id", "r"],
                           env=install.env(), cwd=install.folder, capture_output=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert query(install, "SELECT count(*) FROM sessions") == [(500,)]
    assert query(install, "SELECT count(*), count(DISTINCT file_name) FROM jobs WHERE status = 'accepted'") == [(500, 500)]
    assert sorted(p.name for p in (inbox / "accepted").iterdir()) == [f"job-{n:03d}.json" for n in range(500)]
    assert not any(p.suffix == ".json" for p in inbox.iterdir())
    assert not (inbox / "rejected").exists() or not any((inbox / "rejected").iterdir())
    assert query(install, "SELECT DISTINCT status FROM sessions") == [("completed",)]
    assert kills == 5


def test_a_file_committed_but_not_moved_is_only_moved_on_restart(install):
    """The crash window between the commit and the move, taken on purpose: the file's identity,
    recorded with its ingest, tells it apart from a new drop."""
    from engine.ingest.seen import look_at
    from engine.ingest.jobs import parse_job_bytes

    content = job(params={"prompt": "once"})
    path = install.config.inbox / "once.json"
    path.write_bytes(content)
    seen = look_at(path, 1 << 20)
    source = commands.Source(seen.name, seen.content_hash, seen.identity, "once.json")
    first = commands.submit(install.store, install.intake, parse_job_bytes(content), source)
    assert install.engine.inbox().scan() == []
    assert query(install, "SELECT count(*) FROM sessions") == [(1,)]
    assert query(install, "SELECT target_id FROM jobs") == [(first.target_id,)]
    assert (install.config.inbox / "accepted" / "once.json").read_bytes() == content
    assert not path.exists()


def test_a_crash_between_link_and_unlink_leaves_one_accepted_copy(install):
    """The move out of the inbox is a hard link then an unlink; a crash in between is finished."""

    content = job(params={"prompt": "linked"})
    path = install.config.inbox / "linked.json"
    path.write_bytes(content)
    install.engine.inbox().scan()
    accepted = install.config.inbox / "accepted" / "linked.json"
    import os as _os

    _os.link(accepted, path)  # as if the unlink never happened
    install.engine.inbox().scan()
    assert not path.exists()
    assert sorted(p.name for p in (install.config.inbox / "accepted").iterdir()) == ["linked.json"]
    assert query(install, "SELECT count(*) FROM sessions") == [(1,)]


def test_two_runners_moving_one_file_at_once_record_nothing_false(install, monkeypatch):
    """Two runners that took one file both move it: the other one's hard link lands first (our
    link meets EEXIST), and its unlink lands before our look at the two inodes (ENOENT). The file is
    where it belongs, so nothing is stranded; before, that ENOENT was recorded as "could not be
    moved out of the inbox". The other runner's link and unlink are made for real, in that instant."""
    from engine.ingest import inbox as inbox_module

    content = job(params={"prompt": "raced"})
    path = install.config.inbox / "raced.json"
    path.write_bytes(content)
    real_link = os.link
    raced = []

    def the_other_runner_first(source, destination, **options):
        if not raced and str(source) == str(path):
            raced.append(destination)
            real_link(source, destination, **options)  # the other runner's link...
            os.unlink(source)  # ...and its unlink, before our look
            raise FileExistsError(17, "File exists", str(destination))
        return real_link(source, destination, **options)

    monkeypatch.setattr(inbox_module.os, "link", the_other_runner_first)
    install.engine.inbox().scan()
    assert raced, "the race was not forced"
    assert (install.config.inbox / "accepted" / "raced.json").read_bytes() == content and not path.exists()
    assert query(install, "SELECT count(*) FROM jobs WHERE move_error IS NOT NULL") == [(0,)]
    assert [e.type for e in install.store.all_events() if e.type == "job.stranded"] == []
    assert query(install, "SELECT count(*) FROM sessions") == [(1,)]
