"""The user's contract as a new user meets it, through the CLI and the inbox: names and aliases,
checks at submit, `engine validate`, output for other languages' clients, logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.domains.catalogue import ModelRegistry
from tests.conftest import Installation
from tests.helpers import claim_one, engine_process, query


def engine(install, *args: str) -> subprocess.CompletedProcess:
    """`engine ARGS` in the installation's folder, whatever its exit code."""
    return subprocess.run([sys.executable, "-m", "engine", *args], env=install.env(), capture_output=True, text=True,
                          timeout=300, cwd=install.folder)


def drop(install, name: str, job) -> None:
    path = install.config.inbox / name
    path.write_text(json.dumps(job) if not isinstance(job, str) else job)
    os.utime(path, (0, 0))  # old enough that the inbox takes it at once


def outcomes(install) -> dict:
    return {o.file_name: o for o in install.engine.inbox().scan()}


def test_csharp_and_automatic1111_keys_are_aliases_of_the_contracts(install):
    drop(install, "csharp.json", {"Workflow": "noop1", "Params": {
        "Prompt": "a fox", "NegativePrompt": "blurry", "CfgScale": 4.5, "DenoisingStrength": 0.4, "NumImages": 2}})
    drop(install, "a1111.json", {"workflow": "noop1", "params": {
        "prompt": "an owl", "cfg_scale": 6, "sampler_name": "DPM++ 2M Karras", "batch_size": 2, "n_iter": 3,
        "denoising_strength": 0.3}})
    taken = outcomes(install)
    assert taken["csharp.json"].accepted and taken["a1111.json"].accepted, taken
    params = {json.loads(p)["prompt"]: json.loads(p) for (p,) in query(install, "SELECT params FROM sessions")}
    fox, owl = params["a fox"], params["an owl"]
    assert (fox["negative_prompt"], fox["guidance_scale"], fox["strength"], fox["num_images"]) == ("blurry", 4.5, 0.4, 2)
    assert (owl["guidance_scale"], owl["scheduler"], owl["num_images"], owl["strength"]) == (6, "dpm++2m_karras", 6, 0.3)


def test_loras_and_controlnet_in_pascal_case_reach_the_model_checks(install):
    """LoRAs and ControlNet are words, not lo_r_as and control_net: the keys are taken, and the
    model they name is looked up (and, here, not found)."""
    drop(install, "pascal.json", {"Workflow": "noop1", "Params": {"LoRAs": [{"Model": "style", "Scale": 0.5}]}})
    drop(install, "cn.json", {"Workflow": "noop1", "Params": {"ControlNet": {"Model": "edges", "Image": "x.png"}}})
    taken = outcomes(install)
    assert taken["pascal.json"].code == "UNKNOWN_MODEL" and "loras[0].model" in taken["pascal.json"].message
    assert taken["cn.json"].code == "UNKNOWN_MODEL" and "controlnet.model" in taken["cn.json"].message


def test_an_unknown_key_says_which_known_key_was_meant(install):
    (install.folder / "typo.json").write_text(json.dumps({"workflow": "noop1", "params": {"guidence_scale": 3}}))
    done = engine(install, "submit", "typo.json")
    assert done.returncode == 2
    assert "VALIDATION_ERROR" in done.stderr and "did you mean 'guidance_scale'" in done.stderr


def test_params_given_to_the_cli_are_normalised_as_job_files_are(install):
    shown = json.loads(engine_process(install, "workflows", "noop1", "--params", '{"numImages": 2, "CfgScale": 3}',
                                      "--json"))
    assert shown["id"] == "noop1"
    bad = engine(install, "workflows", "noop1", "--params", "{not json")
    assert bad.returncode == 2 and "--params: not valid JSON" in bad.stderr


def test_json_output_in_camel_or_pascal_case_for_other_languages(install):
    (install.folder / "one.json").write_text(json.dumps({"workflow": "noop1", "params": {"num_images": 2}}))
    engine_process(install, "submit", "one.json")
    snake = json.loads(engine_process(install, "sessions", "--json"))[0]
    camel = json.loads(engine_process(install, "sessions", "--json", "--case", "camel"))[0]
    pascal = json.loads(engine_process(install, "--case", "pascal", "sessions", "--json"))[0]
    assert "session_id" in snake and camel["sessionId"] == snake["session_id"] == pascal["SessionId"]
    assert engine(install, "sessions", "--json", "--case", "kebab").returncode == 2


def test_what_cannot_run_here_is_refused_at_submit(install):
    drop(install, "priority.json", {"workflow": "noop1", "priority": 1000})
    drop(install, "device.json", {"workflow": "noop1", "params": {"device": "cuda:7"}})
    drop(install, "preset.json", {"workflow": "noop1", "params": {"postprocess": [{"op": "enhance", "preset": "vivd"}]}})
    taken = outcomes(install)
    assert taken["priority.json"].code == "VALIDATION_ERROR" and "limits.max_priority (100)" in taken["priority.json"].message
    assert taken["device.json"].code == "VALIDATION_ERROR" and "no device 'cuda:7' on this machine" in taken["device.json"].message
    assert taken["preset.json"].code == "VALIDATION_ERROR" and "unknown enhance preset 'vivd'" in taken["preset.json"].message
    assert query(install, "SELECT count(*) FROM sessions") == [(0,)], "nothing was queued to fail later"


def test_a_template_with_a_step_no_handler_serves_is_refused_when_templates_load(tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "dream.toml").write_text('description = "x"\ngenerates = false\n\n[[steps]]\ntype = "dreaming"\n'
                                       'domain = "test"\n')
    install = Installation(tmp_path / "engine", settings={"paths": {"workflows": str(folder)}})
    drop(install, "dream.json", {"workflow": "dream"})
    taken = outcomes(install)["dream.json"]
    assert taken.code == "VALIDATION_ERROR"
    assert "refused when templates loaded" in taken.message and "'dreaming'" in taken.message
    install.store.close()


def test_the_default_model_is_settable_shown_and_checked_against_the_size_limits(tmp_path):
    from engine.domains.tinymodels import build_tiny_sd15

    models = tmp_path / "models"
    build_tiny_sd15(models / "tiny15")
    install = Installation(tmp_path / "engine", settings={"models": {"default": "second"}})
    registry = ModelRegistry(install.config.models_dir)
    registry.add(models / "tiny15", "first")
    registry.add(models / "tiny15", "second")
    listed = {m["id"]: m["default"] for m in json.loads(engine_process(install, "models", "--json"))}
    assert listed == {"first": False, "second": True}
    drop(install, "default.json", {"workflow": "txt2img", "params": {"prompt": "x", "width": 64, "height": 64}})
    assert outcomes(install)["default.json"].accepted
    assert json.loads(query(install, "SELECT params FROM sessions")[0][0])["model"] == "second"
    strict = Installation(tmp_path / "strict", settings={"limits": {"min_size": 128}})
    ModelRegistry(strict.config.models_dir).add(models / "tiny15", "tiny")
    drop(strict, "small.json", {"workflow": "txt2img", "params": {"prompt": "x"}})
    small = outcomes(strict)["small.json"]
    assert small.code == "VALIDATION_ERROR" and "by default" in small.message and "give width and height" in small.message
    install.store.close()
    strict.store.close()


def test_validate_checks_files_as_the_inbox_would_without_submitting(install):
    good, bad = install.folder / "good.json", install.folder / "bad.json"
    good.write_text(json.dumps({"workflow": "noop1", "params": {"CfgScale": 5}}))
    bad.write_text(json.dumps({"workflow": "noop1", "params": {"stesp": 5}}))
    assert engine(install, "validate", str(good)).returncode == 0
    done = engine(install, "validate", str(good), str(bad), "--json")
    assert done.returncode == 2
    reports = {r["file"]: r for r in json.loads(done.stdout)}
    assert reports["good.json"]["ok"] and not reports["bad.json"]["ok"]
    assert reports["bad.json"]["error"]["code"] == "VALIDATION_ERROR" and "did you mean 'steps'" in reports["bad.json"]["error"]["message"]
    assert query(install, "SELECT count(*) FROM sessions") == [(0,)] and query(install, "SELECT count(*) FROM jobs") == [(0,)]


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_a_runner_without_a_terminal_logs_what_happened(install, log_format):
    (install.folder / "ok.json").write_text(json.dumps({"job_id": "fine-job", "workflow": "noop1"}))
    engine_process(install, "submit", "ok.json")
    drop(install, "broken.json", "{nope")
    (install.config.inbox / "notes.txt").write_text("not a job")
    (install.config.inbox / "later").mkdir()
    (install.config.inbox / "later" / "deeper.json").write_text("{}")  # a job one folder too deep: said
    (install.config.inbox / "images").mkdir()  # a folder of input images, as the README suggests: not said
    done = engine(install, "run", "--until-idle", "--log-format", log_format)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        text = " ".join(r["message"] for r in records)
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    else:
        text = done.stderr
    assert "fine-job" in text and "started" in text and "completed" in text
    assert "broken.json" in text and "rejected" in text
    assert "not taking notes.txt" in text and "not taking the folder later" in text
    assert "folder images" not in text


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_a_file_name_cannot_forge_a_log_line_or_reach_the_terminal(install, log_format):
    """A newline in a job file's name (or in an image path it names) would start a line of its own
    that reads as a real record; a terminal escape would drive the operator's terminal. Every
    logged name is escaped: each line of stderr is one record, and no control character is raw."""
    forged = "evil\n2026-01-01 00:00:00,000 ERROR engine.run: the database is gone\x1b[2J.json"
    drop(install, forged, json.dumps({"workflow": "noop1", "params": {"init_image": "images/a\nb.png"}}))
    drop(install, "also\rbad.json", "{nope")
    done = engine(install, "run", "--until-idle", "--log-format", log_format)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and not any(c in done.stderr for c in "\r\x1b"), done.stderr
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        messages = [r["message"] for r in records]
    else:
        assert all(line[:4].isdigit() and " engine" in line for line in lines), lines
        messages = lines
    assert not any(m.lstrip().startswith("2026-01-01") for m in messages)
    assert any("evil\\n2026-01-01" in m and "\\x1b[2J" in m for m in messages), messages
    assert any("also\\rbad.json" in m for m in messages), messages


def test_a_library_s_warnings_are_log_lines_in_the_chosen_format_too():
    """Libraries (watchdog, diffusers, torch) log through their own loggers; without a handler Python
    prints their warnings as bare text, which broke the JSON lines of a runner's stderr."""
    import io
    import logging

    from engine import logs

    stream = io.StringIO()
    logs.configure("INFO", "json", stream)
    try:
        logging.getLogger("watchdog.observers.inotify").error("queue_events() called when the thread is inactive")
        logging.getLogger("some_library").info("below WARNING: left out")
        logging.getLogger("engine.runner").info("the engine's own, at its level")
        logs.configure("INFO", "json", stream)  # configured again: still one line each
        logging.getLogger("some_library").warning("a warning")
    finally:
        for logger in (logging.getLogger(), logging.getLogger("engine")):
            for handler in [h for h in logger.handlers if getattr(h, "engine_handler", False)]:
                logger.removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in records] == [
        ("watchdog.observers.inotify", "error"), ("engine.runner", "info"), ("some_library", "warning")]


def test_help_shows_flags_as_flags(install):
    """No `<bool>` placeholder on a flag (a typer release rendered one on every flag)."""
    for command in (["run"], ["sessions"], ["submit"], ["models", "add"]):
        shown = engine(install, *command, "--help")
        assert shown.returncode == 0 and "--help" in shown.stdout and "<bool>" not in shown.stdout, shown.stdout


def test_a_safetensors_file_that_is_no_upscaler_is_not_registered_as_one(install, tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.domains.tinymodels import build_tiny_upscaler

    save_file({"some.weight": torch.zeros(4, 4)}, str(tmp_path / "mystery.safetensors"))
    done = engine(install, "models", "add", str(tmp_path / "mystery.safetensors"), "--id", "mystery")
    assert done.returncode == 2 and "not an upscaler spandrel knows" in done.stderr
    build_tiny_upscaler(tmp_path / "up.safetensors")
    engine_process(install, "models", "add", str(tmp_path / "up.safetensors"), "--id", "up")
    assert {m["id"]: m["kind"] for m in json.loads(engine_process(install, "models", "--json"))} == {"up": "upscaler"}


def test_rocm_and_intel_xpu_devices_are_found_and_ordered(monkeypatch):
    """Nothing here has an AMD or Intel GPU: torch's own APIs are stood in for (as a ROCm build and
    an XPU build of torch answer them) to check that discovery reports and orders them."""
    from types import SimpleNamespace

    import torch

    from engine.domains import device

    properties = SimpleNamespace(name="Radeon PRO W7900", major=11, total_memory=48 * 2**30)
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (40 * 2**30, 48 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    found = device.discover()
    rocm = next(d for d in found if d.kind == "rocm")
    assert (rocm.id, rocm.name, rocm.total_memory) == ("cuda:0", "Radeon PRO W7900", 48 * 2**30)
    assert device.select("auto", found) == rocm and device.select("rocm", found) == rocm
    assert device.generator_device(rocm) == "cuda" and str(device.dtype_for(rocm)) == "torch.float16"
    xpu = device.DeviceInfo("xpu:0", "xpu", 0, "Arc A770", 16 * 2**30, 15 * 2**30, True, True)
    cpu = next(d for d in found if d.kind == "cpu")
    assert device.select("auto", [cpu, xpu]) == xpu and device.generator_device(xpu) == "xpu"
    assert cpu.total_memory > 0 and cpu.free_memory > 0, "system memory through psutil"


def test_session_progress_weighs_a_denoise_above_a_device_lookup(backend_install):
    """With the device and model steps done and the inference step half way, the session is
    (1 + 2 + 0.5 x 20) / 23 done, not (2 + 0.5) / 3 (each step counting the same)."""
    from engine.run import claims
    from engine.run.claims import Policy
    from tests.helpers import submit

    install = backend_install
    session_id = submit(install, {"workflow": "weighted"}).target_id
    policy = Policy.from_config(install.config)
    for _ in range(2):
        claim = claim_one(install.store, "r1", policy)
        install.store.write(lambda tx: claims.complete_in(tx, claim, {"images": [], "files": [], "data": {}}, 0.0))
    claim = claim_one(install.store, "r1", policy)
    assert claim.step_index == 2
    claims.heartbeat_all(install.store, [claim], policy, 0.5, "denoising 15/30")
    (progress,), = query(install, "SELECT progress FROM session_status WHERE session_id = :s", s=session_id)
    assert progress == pytest.approx((1 + 2 + 0.5 * 20) / 23)


def test_engine_runners_lists_each_runner_and_a_stopped_one_as_stopped(install):
    (install.folder / "one.json").write_text(json.dumps({"workflow": "noop1"}))
    engine_process(install, "submit", "one.json")
    engine_process(install, "run", "--until-idle", "--runner-id", "host-a-1")
    listed = json.loads(engine_process(install, "runners", "--json"))
    mine = next(r for r in listed if r["runner_id"] == "host-a-1")
    assert mine["status"] == "stopped" and mine["pid"] > 0 and mine["host"] and mine["version"]
    assert engine(install, "runners").returncode == 0
