"""Every input is answered at submit, not at run time: hostile and mistaken jobs are refused with
a contract code and a message that points at the right key, and `engine validate` says exactly
what the inbox would, reading the store and writing nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from engine.errors import ValidationError
from tests.conftest import Installation
from tests.helpers import query, submit


def drop(install, name: str, job) -> None:
    path = install.config.inbox / name
    path.write_bytes(job if isinstance(job, bytes) else json.dumps(job).encode())
    os.utime(path, (0, 0))  # old enough that the inbox takes it at once


def outcomes(install) -> dict:
    return {o.file_name: o for o in install.engine.inbox().scan()}


def engine(install, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], env=install.env(), capture_output=True, text=True,
                          timeout=120, cwd=install.folder, input=stdin)


def refused(install, job: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        submit(install, job)
    return caught.value


def corrupt_png(width: int = 32, height: int = 32) -> bytes:
    """A PNG whose header is sound and whose compressed pixel stream is not: verify() passes it."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    raw = bytearray(buffer.getvalue())
    start = raw.index(b"IDAT") + 4
    raw[start + 2:start + 12] = b"\xff" * 10
    length = int.from_bytes(raw[start - 8:start - 4], "big")
    crc = zlib.crc32(bytes(raw[start - 4:start + length]))
    raw[start + length:start + length + 4] = crc.to_bytes(4, "big")  # a valid CRC: only the stream is broken
    return bytes(raw)


def test_a_matrix_with_an_empty_list_is_refused_at_submit_naming_it(install):
    empty_product = refused(install, {"kind": "batch", "workflow": "noop1", "matrix": {"product": {"seed": []}}})
    assert "matrix.product.seed" in empty_product.message and "no items" in empty_product.message
    empty_zip = refused(install, {"kind": "batch", "workflow": "noop1", "matrix": {"zip": {"seed": [], "prompt": []}}})
    assert "matrix.zip" in empty_zip.message
    assert query(install, "SELECT count(*) FROM batches")[0][0] == 0


def test_a_corrupt_input_image_is_refused_at_submit_though_its_header_is_sound(install):
    images = install.config.inbox / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(corrupt_png())
    with Image.open(images / "broken.png") as image:
        image.verify()  # what used to be the whole check
    error = refused(install, {"workflow": "upscale", "params": {"init_image": "images/broken.png"}})
    assert error.code == "VALIDATION_ERROR" and "params.init_image" in error.message and "not a readable image" in error.message
    drop(install, "broken.json", {"workflow": "upscale", "params": {"init_image": "images/broken.png"}})
    outcome = outcomes(install)["broken.json"]
    assert not outcome.accepted and "not a readable image" in outcome.message
    assert (images / "broken.png").read_bytes() == corrupt_png(), "its bytes are kept"


def test_upscaling_past_the_output_pixel_limit_is_refused_at_submit_through_the_whole_chain(tmp_path):
    install = Installation(tmp_path / "engine", settings={"limits": {"max_output_pixels": 256 * 256}})
    try:
        images = install.config.inbox / "images"
        images.mkdir()
        Image.new("RGB", (64, 64)).save(images / "small.png")
        chained = refused(install, {"workflow": "upscale", "params": {"init_image": "images/small.png", "postprocess": [
            {"op": "upscale", "scale": 2}, {"op": "enhance", "preset": "crisp"}, {"op": "upscale", "scale": 4}]}})
        assert "params.postprocess[2].scale" in chained.message and "512x512" in chained.message
        assert "limits.max_output_pixels" in chained.message
        default = refused(install, {"workflow": "upscale", "params": {"init_image": "images/small.png",
                                                                       "postprocess": [{"op": "upscale", "scale": 8}]}})
        assert "postprocess[0].scale" in default.message
        assert submit(install, {"workflow": "upscale", "params": {"init_image": "images/small.png",
                                                                  "postprocess": [{"op": "upscale", "scale": 4}]}})
    finally:
        install.store.close()


def test_a_nul_in_a_key_is_refused_with_a_message_every_store_can_hold(backend_install):
    drop(backend_install, "nul.json", b'{"workflow": "noop1", "params": {"a\\u0000": 1}}')
    outcome = outcomes(backend_install)["nul.json"]
    assert not outcome.accepted and outcome.code == "VALIDATION_ERROR"
    stored = query(backend_install, "SELECT error_message FROM jobs")[0][0]
    assert "a\\x00" in stored and "unknown key" in stored
    details = json.loads(query(backend_install, "SELECT data FROM events WHERE type = 'job.rejected'")[0][0])
    assert [d["loc"] for d in details["error"]["details"]] == ["params.a\\x00"]
    assert "\x00" not in stored and backend_install.store.verify() == []
    error_file = backend_install.config.inbox / "rejected" / "nul.json.error.json"
    assert json.loads(error_file.read_text())["code"] == "VALIDATION_ERROR"


def test_engine_validate_reads_as_the_inbox_reads_and_writes_nothing(tmp_path):
    install = Installation(tmp_path / "engine", settings={"inbox": {"max_file_bytes": 4096}})
    try:
        submit(install, {"workflow": "noop1", "job_id": "taken"})
        folder = tmp_path / "jobs"
        folder.mkdir()
        (folder / "big.json").write_text(json.dumps({"workflow": "noop1", "params": {"prompt": "x" * 5000}}))
        (folder / "real.json").write_text(json.dumps({"workflow": "noop1"}))
        (folder / "link.json").symlink_to(folder / "real.json")
        (folder / "stop.json").write_text(json.dumps({"kind": "control", "target": "ses-nobody", "action": "cancel"}))
        (folder / "again.json").write_text(json.dumps({"workflow": "noop1", "job_id": "taken"}))
        os.mkfifo(folder / "pipe.json")
        before = query(install, "SELECT count(*) FROM events")[0][0]
        done = engine(install, "validate", "--json", *(str(folder / n) for n in
                                                       ("big.json", "link.json", "stop.json", "again.json", "pipe.json",
                                                        "real.json")))
        assert done.returncode == 2, done.stderr
        codes = {r["file"]: (r["error"] or {}).get("code") for r in json.loads(done.stdout)}
        assert codes == {"big.json": "VALIDATION_ERROR", "link.json": "UNSAFE_PATH", "stop.json": "NOT_FOUND",
                         "again.json": "DUPLICATE_JOB", "pipe.json": "VALIDATION_ERROR", "real.json": None}
        big = next(r for r in json.loads(done.stdout) if r["file"] == "big.json")
        assert "at most 4096 are taken" in big["error"]["message"]
        assert query(install, "SELECT count(*) FROM events")[0][0] == before
        for name, code in (("big.json", "VALIDATION_ERROR"), ("stop.json", "NOT_FOUND"), ("again.json", "DUPLICATE_JOB")):
            drop(install, name, (folder / name).read_bytes())
        taken = outcomes(install)
        assert {name: taken[name].code for name in ("big.json", "stop.json", "again.json")} == {
            "big.json": "VALIDATION_ERROR", "stop.json": "NOT_FOUND", "again.json": "DUPLICATE_JOB"}
    finally:
        install.store.close()


def test_messages_point_at_the_key_meant_and_at_the_configured_limit(install):
    typo = refused(install, {"workflow": "noop1", "params": {"guidence": 5}})
    assert "did you mean 'guidance_scale'" in typo.message
    steps = refused(install, {"workflow": "noop1", "params": {"steps": 100000}})
    assert "at most 150" in steps.message and "limits.max_steps" in steps.message
    matrix = refused(install, {"kind": "batch", "workflow": "noop1", "matrix": {"product": {"sede": [1, 2]}}})
    assert matrix.message.startswith("matrix.product.sede") and "did you mean 'seed'" in matrix.message
    shared = refused(install, {"kind": "batch", "workflow": "noop1", "params": {"promt": "x"}, "items": [{}]})
    assert shared.message.startswith("params.promt")
    config = refused(install, {"kind": "batch", "workflow": "noop1", "config": {"max_batch_size": 2}, "items": [{}]})
    assert "did you mean 'batch'" in config.message
    from engine.domains.tinymodels import build_tiny_upscaler

    from engine.domains.catalogue import ModelRegistry

    build_tiny_upscaler(install.folder / "up.safetensors")
    ModelRegistry(install.config.models_dir).add(install.folder / "up.safetensors", "up")
    wrong_kind = refused(install, {"workflow": "txt2img", "params": {"model": "up"}})
    assert wrong_kind.code == "UNKNOWN_MODEL" and "'up' is a registered upscaler, not a pipeline" in wrong_kind.message


def test_a_new_installation_writes_its_config_and_says_how_to_get_a_model(tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    env = {k: v for k, v in Installation(tmp_path / "other").env().items() if k != "ENGINE_CONFIG"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "engine", *args], env=env, cwd=folder,
                                       capture_output=True, text=True, timeout=120)
    assert run("init").returncode == 0
    from engine.config import DEFAULTS_FILE

    assert (folder / "config.toml").read_text() == DEFAULTS_FILE.read_text()
    listed = run("models")
    assert listed.returncode == 0 and "engine models add" in listed.stderr and "engine demo" in listed.stderr
    assert json.loads(run("models", "--json").stdout) == []


def test_the_tiny_model_makes_pictures_within_the_default_limits_when_a_job_gives_no_size(tmp_path):
    from engine.domains.catalogue import ModelRegistry
    from engine.domains.tinymodels import build_tiny_sd15

    install = Installation(tmp_path / "engine")
    try:
        build_tiny_sd15(tmp_path / "tiny15")
        ModelRegistry(install.config.models_dir).add(tmp_path / "tiny15", "tiny")
        done = submit(install, {"workflow": "txt2img", "params": {"prompt": "a fox"}})
        params = json.loads(query(install, "SELECT params FROM sessions WHERE session_id = :s", s=done.target_id)[0][0])
        assert (params["width"], params["height"]) == (64, 64)
    finally:
        install.store.close()


def test_engine_batch_shows_its_metrics_and_the_status_of_paused_items(install):
    done = submit(install, {"kind": "batch", "workflow": "noop1", "job_id": "held", "hold": True, "items": [{}, {}]})
    shown = engine(install, "batch", "held")
    assert shown.returncode == 0, shown.stderr
    assert "metrics: pipeline calls" in shown.stdout and "paused" in shown.stdout.split("metrics:")[1]
    assert " pending " not in shown.stdout.split("metrics:")[1]
    listed = subprocess.run([sys.executable, "-m", "engine", "batches"], env={**install.env(), "COLUMNS": "80"},
                            capture_output=True, text=True, timeout=120, cwd=install.folder)
    assert done.target_id in listed.stdout and all(len(line) <= 100 for line in listed.stdout.splitlines())


def test_a_file_modified_in_the_future_is_not_still_being_written(install):
    path = install.config.inbox / "skewed.json"
    path.write_text("{not json yet")
    future = __import__("time").time() + 3600  # a copy from a machine whose clock runs an hour ahead
    os.utime(path, (future, future))
    outcome = outcomes(install)["skewed.json"]
    assert not outcome.accepted and outcome.code == "VALIDATION_ERROR"
    (install.config.inbox / "later.json").write_text(json.dumps({"workflow": "noop1"}))
    os.utime(install.config.inbox / "later.json", (future, future))
    assert outcomes(install)["later.json"].accepted


def test_the_runner_logs_a_session_ended_by_a_command_made_elsewhere(install):
    session_id = submit(install, {"workflow": "sleepy", "params": {"steps": 60}}).target_id  # a 6 s step
    runner = subprocess.Popen([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], env=install.env(),
                              cwd=install.folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = __import__("time").monotonic() + 60
    while query(install, "SELECT count(*) FROM leases WHERE session_id = :s AND step_index = 1", s=session_id) != [(1,)]:
        assert __import__("time").monotonic() < deadline, "the sleep step never started"
        __import__("time").sleep(0.05)
    assert engine(install, "cancel", session_id, "--yes").returncode == 0
    _, logged = runner.communicate(timeout=120)
    assert runner.returncode == 0
    assert f"session {session_id} cancelled (by request)" in logged, logged


def test_a_valid_job_waits_in_the_inbox_while_the_database_disk_is_full_and_is_taken_when_space_returns(tmp_path):
    import logging

    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        install = Installation(folder / "engine")
        drop(install, "valid.json", {"workflow": "noop1", "job_id": "waits", "params": {"prompt": "x" * 4000}})
        from tests.test_hardening import fill

        filler = fill(folder)
        said = []
        handler = logging.Handler(logging.INFO)
        handler.emit = said.append
        logging.getLogger("engine.inbox").addHandler(handler)  # whatever an earlier test did to logging
        inbox = install.engine.inbox()
        for _ in range(8):  # more than the failures after which a file of its own fault is rejected
            assert inbox.scan() == []
        assert (install.config.inbox / "valid.json").exists() and not list((install.config.inbox / "rejected").glob("*"))
        logging.getLogger("engine.inbox").removeHandler(handler)
        told = [r.getMessage() for r in said if "database" in r.getMessage()]
        assert 1 <= len(told) <= 2, told
        filler.unlink()
        outcome = {o.file_name: o for o in inbox.scan()}["valid.json"]
        assert outcome.accepted
        install.store.close()
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
