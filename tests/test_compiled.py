"""The compiled fast path on the tiny models, on the CPU: torch.compile with the "eager" backend
traces the same graphs a GPU compiles (with no compiler, so it runs anywhere); a backend that
raises stands for a compile that fails, one that waits for a compile that takes a while. GPU speed
is measured by bench/bench_compile_gpu.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.domains.accelerate import bucket_split
from engine.domains.catalogue import ModelRegistry
from tests.conftest import Installation
from tests.helpers import engine_process, query, run_until_idle, submit

SIZE = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.domains.tinymodels import build_tiny_sd15

    folder = tmp_path_factory.mktemp("models") / "tiny15"
    build_tiny_sd15(folder)
    return folder


def studio(tmp_path, tiny, backend: str = "eager", background: bool = False, coalesce: bool = True,
           scope: str = "whole") -> Installation:
    install = Installation(tmp_path / "engine", settings={"handlers": {"modules": ["engine.domains",
                                                                                  "tests.compile_backends"]},
                                                         "compile": {"backend": backend, "batch_sizes": [1, 2],
                                                                     "background": background, "scope": scope},
                                                         "batching": {"coalesce": coalesce}})
    registry = ModelRegistry(install.config.models_dir)
    registry.add(tiny, "plain")
    registry.add(tiny, "fast", compile_setting="on")
    return install


def pictures(install, session_id: str) -> list[np.ndarray]:
    result = json.loads((install.config.outbox / session_id / "result.json").read_text())
    return [np.asarray(Image.open(install.config.outbox / session_id / name), dtype=np.int16)
            for name in result["images"]]


def events(install, kind: str) -> list[dict]:
    return [json.loads(row[0]) for row in query(install, "SELECT data FROM event_log WHERE type = :t ORDER BY event_id",
                                                t=kind)]


def test_calls_are_split_into_compiled_sizes_largest_first():
    assert bucket_split(7, [1, 2, 4, 8]) == [4, 2, 1]
    assert bucket_split(8, [1, 2, 4, 8]) == [8]
    assert bucket_split(3, [2]) == [2, 1], "below the smallest compiled size: as it is"
    assert bucket_split(0, [1]) == []


def test_the_compiled_path_makes_the_same_images_and_records_what_it_compiled(tmp_path, tiny):
    install = studio(tmp_path, tiny)
    job = {"workflow": "txt2img", "params": {**SIZE, "prompt": "a fox", "seed": 11, "num_images": 3}}
    plain = submit(install, {**job, "params": {**job["params"], "model": "plain"}}).target_id
    fast = submit(install, {**job, "params": {**job["params"], "model": "fast"}}).target_id
    run_until_idle(install)
    assert query(install, "SELECT status, error_message FROM sessions ORDER BY created_event") == [
        ("completed", None), ("completed", None)]
    for eager, compiled in zip(pictures(install, plain), pictures(install, fast)):
        assert np.abs(eager - compiled).max() <= 2, "the compiled path makes the same picture"
    compiled = events(install, "model.compiled")
    assert sorted(e["shape"][1] for e in compiled) == [1, 2], "three images: a compiled call of 2 and one of 1"
    assert all(e["model_id"] == "fast" and e["shape"][2:] == [64, 64] and e["seconds"] > 0 for e in compiled)
    data = json.loads((install.config.outbox / fast / "result.json").read_text())["steps"][2]["data"]
    assert data["group_images"] == 3 and data["call_images"] == 2
    assert not events(install, "model.compile_failed")
    listed = {m["id"]: m["compile"] for m in json.loads(engine_process(install, "models", "--json"))}
    assert listed == {"plain": "off (default)", "fast": "on"}


def test_a_compile_that_fails_falls_back_to_the_eager_call_and_the_image_is_made(tmp_path, tiny):
    install = studio(tmp_path, tiny, backend="engine_test_broken")
    first = submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "fast", "prompt": "owl", "seed": 5}})
    second = submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "plain", "prompt": "owl", "seed": 5}})
    run_until_idle(install)
    assert query(install, "SELECT status, error_message FROM sessions ORDER BY created_event") == [
        ("completed", None), ("completed", None)]
    assert np.abs(pictures(install, first.target_id)[0] - pictures(install, second.target_id)[0]).max() <= 2
    failed = events(install, "model.compile_failed")
    assert len(failed) == 1 and failed[0]["shape"][1] == 1 and "cannot compile" in failed[0]["error"]
    assert not events(install, "model.compiled")


def _generation_data(install, session_id: str) -> dict:
    steps = json.loads((install.config.outbox / session_id / "result.json").read_text())["steps"]
    return next(step["data"] for step in steps if step["type"] == "inference_generation")


def _feed_until(install, params: dict, done, seconds: float = 240.0) -> list[str]:
    """A real `engine run` fed single sessions (always a few waiting) until `done()`, then the rest
    run; returns the sessions in the order submitted."""
    runner = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet"], env=install.env(),
                              cwd=install.folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sessions: list[str] = []
    try:
        deadline = time.monotonic() + seconds
        while not done():
            assert runner.poll() is None, runner.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the background compile did not switch in time"
            waiting = query(install, "SELECT count(*) FROM sessions WHERE status = 'pending'")[0][0]
            for _ in range(max(0, 3 - waiting)):
                sessions.append(submit(install, {"workflow": "txt2img", "priority": 50, "params": {
                    **params, "seed": 40 + len(sessions)}}).target_id)
            time.sleep(0.05)
        for _ in range(3):  # calls after the switch
            sessions.append(submit(install, {"workflow": "txt2img", "priority": 50, "params": {
                **params, "seed": 40 + len(sessions)}}).target_id)
        while query(install, "SELECT count(*) FROM sessions WHERE status NOT IN ('completed', 'failed')")[0][0]:
            assert time.monotonic() < deadline + 60, "the sessions did not end"
            time.sleep(0.1)
    finally:
        runner.send_signal(signal.SIGINT)
        runner.wait(timeout=60)
    return sessions


def _switched(install) -> list[dict]:
    return [e for e in events(install, "model.compiled") if e.get("background")]


def test_a_shape_compiles_in_another_process_while_its_calls_go_on_eagerly_and_then_switches(tmp_path, tiny):
    install = studio(tmp_path, tiny, backend="engine_test_slow", background=True, coalesce=False)
    params = {**SIZE, "steps": 6, "model": "fast", "prompt": "a heron"}
    reference = submit(install, {"workflow": "txt2img", "priority": 90,
                                 "params": {**params, "model": "plain", "seed": 40}}).target_id
    sessions = _feed_until(install, params, lambda: _switched(install))
    assert query(install, "SELECT DISTINCT status FROM sessions") == [("completed",)]
    started, = events(install, "model.compile_started")
    assert started["background"] is True and started["shape"] == ["txt2img", 1, 64, 64] and started["pid"] > 0
    assert started["scope"] == "whole"
    assert "1 x 64x64" in Path(started["log"]).read_text(), "the other process's own words, kept in its log"
    # the other process compiled and recorded it (as `engine warmup` does), then this one switched
    warmed = [e for e in events(install, "model.compiled") if not e.get("background")]
    assert [e["shape"] for e in warmed] == [["txt2img", 1, 64, 64]]
    switched, = _switched(install)
    assert switched["seconds"] >= 3.0 and switched["eager_calls"] >= 1 and switched["first_call_seconds"] > 0
    ran = [_generation_data(install, session_id)["compiled"] for session_id in sessions]
    assert ran[0] is False, "the first call is made eagerly: no image waits for the compile"
    assert ran[-1] is True, "calls after the compile run compiled"
    assert ran == sorted(ran), "eager until the switch, compiled after it"
    assert ran.count(False) == switched["eager_calls"]
    assert np.abs(pictures(install, sessions[0])[0] - pictures(install, reference)[0]).max() <= 2
    assert not events(install, "model.compile_failed")
    # a later process: the shape is known compiled here, so it compiles from the caches at once
    later = submit(install, {"workflow": "txt2img", "params": {**params, "seed": 7}}).target_id
    engine_process(install, "run", "--until-idle", "--quiet")
    assert _generation_data(install, later)["compiled"] is True
    assert len(events(install, "model.compile_started")) == 1, "no second background compile"
    assert [e.get("background", False) for e in events(install, "model.compiled")][-1] is False


def test_a_background_compile_starts_only_where_the_device_has_room_for_a_second_copy():
    from engine.domains.accelerate import BACKGROUND_ROOM, background_room

    weights = 7 * 2**30
    assert background_room(int(BACKGROUND_ROOM * weights), weights, running=0) == "start"
    assert background_room(int(BACKGROUND_ROOM * weights), weights, running=1) == "start"
    assert background_room(weights, weights, running=1) == "wait", "another compile's memory comes back"
    assert background_room(weights, weights, running=0) == "foreground", "there will never be room"


def test_with_no_room_on_the_device_a_shape_compiles_in_the_foreground_and_no_process_starts(tmp_path, tiny,
                                                                                           monkeypatch, caplog):
    from engine.domains import accelerate

    install = studio(tmp_path, tiny, background=True, coalesce=False)
    # The device's real free memory, against a second copy that wants more than any device has.
    monkeypatch.setattr(accelerate, "BACKGROUND_ROOM", 2.0**50)
    first = submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "fast", "prompt": "a wren",
                                                                "seed": 3}}).target_id
    second = submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "fast", "prompt": "a wren",
                                                                 "seed": 4}}).target_id
    run_until_idle(install)
    assert query(install, "SELECT DISTINCT status FROM sessions") == [("completed",)]
    assert not events(install, "model.compile_started"), "no second copy of the model was started"
    assert "too little free memory for a second copy" in caplog.text
    assert [_generation_data(install, s)["compiled"] for s in (first, second)] == [False, True]
    compiled, = events(install, "model.compiled")
    assert not compiled.get("background") and compiled["shape"] == ["txt2img", 1, 64, 64]


def test_a_background_compile_that_fails_leaves_the_shape_eager_and_every_image_is_made(tmp_path, tiny):
    install = studio(tmp_path, tiny, backend="engine_test_broken", background=True, coalesce=False)
    params = {**SIZE, "steps": 4, "model": "fast", "prompt": "a crane"}
    sessions = _feed_until(install, params, lambda: [
        e for e in events(install, "model.compile_failed") if e.get("background")])
    assert query(install, "SELECT DISTINCT status FROM sessions") == [("completed",)]
    assert len(events(install, "model.compile_started")) == 1
    failed = [e for e in events(install, "model.compile_failed") if e.get("background")]
    assert len(failed) == 1 and "exited with 1" in failed[0]["error"] and "cannot compile" in failed[0]["error"]
    assert not any(_generation_data(install, s)["compiled"] for s in sessions)
    assert not _switched(install)


def test_regional_scope_compiles_each_kind_of_repeated_block_and_makes_the_same_images(tmp_path, tiny):
    from engine.domains import accelerate

    install = studio(tmp_path, tiny, scope="regional")  # and the default mode, reduce-overhead
    job = {"workflow": "txt2img", "params": {**SIZE, "prompt": "a fox", "seed": 11, "num_images": 2}}
    plain = submit(install, {**job, "params": {**job["params"], "model": "plain"}}).target_id
    fast = submit(install, {**job, "params": {**job["params"], "model": "fast"}}).target_id
    engine_process(install, "run", "--until-idle", "--quiet")
    for eager, compiled in zip(pictures(install, plain), pictures(install, fast)):
        assert np.abs(eager - compiled).max() <= 2, "the regional path makes the same picture"
    compiled, = events(install, "model.compiled")
    assert compiled["scope"] == "regional" and compiled["shape"][1] == 2
    assert compiled["mode"] == "default", "repeated blocks compile without CUDA graphs"
    assert [accelerate.regional_mode(m) for m in accelerate.MODES] == [
        "default", "default", "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"]
    # what it compiles: every transformer block of the tiny UNet, by its place in the module tree
    from diffusers import StableDiffusionPipeline

    unet = StableDiffusionPipeline.from_pretrained(str(tiny)).unet
    blocks = accelerate.repeated_blocks(unet)
    assert blocks and all(type(m).__name__ == "BasicTransformerBlock" for m in blocks.values())
    assert len(blocks) == sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")


def test_warmup_compiles_ahead_and_refuses_what_is_not_a_size(tmp_path, tiny):
    install = studio(tmp_path, tiny)
    out = engine_process(install, "warmup", "fast", "--sizes", "64x64", "--batch-sizes", "1,2", "--steps", "1",
                         "--json")
    report = json.loads(out.strip().splitlines()[-1])
    assert [(r["images"], r["width"], r["compiled"]) for r in report] == [(1, 64, True), (2, 64, True)]
    assert sorted(e["shape"][1] for e in events(install, "model.compiled")) == [1, 2]
    bad = subprocess.run([sys.executable, "-m", "engine", "warmup", "fast", "--sizes", "big"], env=install.env(),
                         capture_output=True, text=True, timeout=120, cwd=install.folder)
    assert bad.returncode == 2 and "VALIDATION_ERROR" in bad.stderr and "WIDTHxHEIGHT" in bad.stderr


def test_images_rounded_on_the_device_are_diffusers_own_pixel_for_pixel():
    """The compiled path's readback rounds before the images leave the device: the same pixels as
    diffusers' float32-on-the-CPU rounding, at the rounding boundaries too, for float16 and float32
    decoder outputs, RGB and one channel; other output types are diffusers' own."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from engine.domains.readback import round_on_device, to_pictures

    generator = torch.Generator().manual_seed(0)
    boundaries = (torch.arange(256, dtype=torch.float32) + 0.5) / 255  # where rounding changes its mind
    for dtype in (torch.float32, torch.float16):
        for channels in (3, 1):
            images = torch.rand(3, channels, 16, 32, generator=generator).to(dtype)
            images.view(-1)[:256] = boundaries.to(dtype)
            expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
            got = to_pictures(images)
            assert [picture.mode for picture in got] == [picture.mode for picture in expected]
            for mine, theirs in zip(got, expected):
                assert np.array_equal(np.asarray(mine), np.asarray(theirs)), (dtype, channels)
    processor = VaeImageProcessor()
    decoded = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1  # a decoder's output, in [-1, 1]
    expected = [np.asarray(p) for p in processor.postprocess(decoded, output_type="pil")]
    assert round_on_device(processor) is round_on_device(processor), "made once"
    assert all(np.array_equal(np.asarray(p), e) for p, e in zip(processor.postprocess(decoded), expected))
    assert torch.equal(processor.postprocess(decoded, output_type="pt"), (decoded / 2 + 0.5).clamp(0, 1))
    half = processor.postprocess(decoded, output_type="pil", do_denormalize=[True, False])
    assert np.array_equal(np.asarray(half[0]), expected[0]) and not np.array_equal(np.asarray(half[1]), expected[1])


def test_an_upcast_vae_decodes_in_bfloat16_while_the_pipeline_casts_its_vae(tmp_path):
    """The compiled path's decoder for a VAE diffusers upcasts (float16, force_upcast): run inside
    the real pipeline, it keeps its bfloat16 weights through the pipeline's float32 upcast and its
    cast back, hands back the pipeline's dtype, and makes nearly the float32 picture."""
    import copy

    import torch
    from diffusers import StableDiffusionXLPipeline

    from engine.domains.accelerate import decoder_in, upcast_decode_dtype
    from engine.domains.tinymodels import build_tiny_sdxl

    build_tiny_sdxl(tmp_path / "xl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", torch_dtype=torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    pipe.set_progress_bar_config(disable=True)
    assert upcast_decode_dtype(pipe, "bfloat16") is None, "on a CPU: decoded as diffusers does"
    with pytest.raises(ValueError, match="vae_upcast"):
        upcast_decode_dtype(pipe, "float8")

    def make(**kwargs):
        return pipe(prompt="a lighthouse", num_inference_steps=2, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(3), **kwargs).images[0]

    reference = make()  # diffusers' own: the VAE upcast to float32 around decoding
    eager = pipe.vae.decoder
    inner = copy.deepcopy(eager).to(torch.bfloat16)
    pipe.vae.decoder = decoder_in(inner, torch.bfloat16)
    seen = []
    inner.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    fast = make()
    assert seen == [(torch.bfloat16, torch.bfloat16)], "the decoder ran in bfloat16"
    assert next(inner.parameters()).dtype == torch.bfloat16, "the pipeline's casts left its weights alone"
    assert pipe.vae.dtype == torch.float16, "the pipeline cast its VAE back"
    mse = float(((fast.astype(np.float64) - reference.astype(np.float64)) ** 2).mean())
    assert 10 * np.log10(1 / max(mse, 1e-20)) > 30, "nearly the float32 picture"
    pipe.vae.decoder = eager
    assert np.array_equal(make(), reference), "the eager decoder is untouched"


def test_a_background_compile_dies_with_its_runner_even_by_sigkill(tmp_path, tiny):
    import psutil

    install = studio(tmp_path, tiny, backend="engine_test_slow", background=True, coalesce=False)
    for n in range(3):
        submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "fast", "prompt": "a stork", "seed": n}})
    env = {**install.env(), "ENGINE_TEST_COMPILE_SECONDS": "600"}  # it would compile for ten minutes
    runner = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet"], env=env, cwd=install.folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not events(install, "model.compile_started"):
            assert time.monotonic() < deadline and runner.poll() is None
            time.sleep(0.1)
        compiling = psutil.Process(events(install, "model.compile_started")[0]["pid"])
        assert "warmup" in compiling.cmdline()
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
    compiling.wait(timeout=30)  # gone with its runner (psutil raises TimeoutExpired otherwise)
    assert not compiling.is_running()
