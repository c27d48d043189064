"""The real domain handlers on tiny diffusers models built in code and loaded back through the
registry and the real loading code: txt2img, img2img, inpaint, ControlNet, LoRAs, schedulers,
determinism, cancel, upscale through spandrel, enhance, safety check, memory, DirectML selection."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from engine import commands
from engine.errors import EngineError, UnsafeModelFormat
from engine.domains.catalogue import ModelRegistry
from tests.conftest import ROOT, Installation
from tests.helpers import engine_process, query, run_until_idle, runner, status, submit

pytestmark = pytest.mark.domains

SIZE = {"width": 64, "height": 64, "steps": 3, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from engine.domains.tinymodels import (build_tiny_controlnet, build_tiny_lora, build_tiny_safety_checker, build_tiny_sd15,
                                   build_tiny_sdxl, build_tiny_upscaler)

    folder = tmp_path_factory.mktemp("models")
    build_tiny_sdxl(folder / "tiny")
    build_tiny_sd15(folder / "tiny15")
    build_tiny_safety_checker(folder / "safety-strict", flag_everything=True)
    build_tiny_upscaler(folder / "up.safetensors")
    build_tiny_controlnet(folder / "cn", folder / "tiny")
    build_tiny_lora(folder / "style.safetensors", folder / "tiny")
    build_tiny_controlnet(folder / "cn15", folder / "tiny15")
    build_tiny_lora(folder / "style15.safetensors", folder / "tiny15")
    return folder


@pytest.fixture
def studio(tmp_path, models) -> Installation:
    install = Installation(tmp_path / "engine", settings={"handlers": {"modules": ["engine.domains", "tests.handlers"]}})
    registry = ModelRegistry(install.config.models_dir)
    registry.add(models / "tiny", "tiny")
    registry.add(models / "tiny15", "tiny15")
    registry.add(models / "up.safetensors", "up")
    registry.add(models / "cn", "cn")
    registry.add(models / "style.safetensors", "style")
    registry.add(models / "style15.safetensors", "style15")
    registry.add(models / "cn15", "cn15")
    images = install.config.inbox / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(images / "start.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(images / "mask.png")
    yield install
    install.store.close()


def result_of(install, session_id: str) -> dict:
    folder = install.config.outbox / session_id
    return json.loads((folder / "result.json").read_text())


def images_of(install, session_id: str) -> list[Image.Image]:
    result = result_of(install, session_id)
    return [Image.open(install.config.outbox / session_id / name) for name in result["images"]]


def test_txt2img_end_to_end_with_a1111_parameters_and_one_model_load(studio):
    first = submit(studio, {"workflow": "txt2img", "params": {**SIZE, "prompt": "a lighthouse", "seed": 42,
                                                               "num_images": 2, "negative_prompt": "blurry"}})
    second = submit(studio, {"workflow": "txt2img", "params": {**SIZE, "prompt": "a harbour", "seed": 9}})
    run_until_idle(studio)
    assert status(studio, first.target_id) == status(studio, second.target_id) == "completed"
    result = result_of(studio, first.target_id)
    assert result["images"] == ["00000-42.png", "00001-43.png"] and result["seed"] == 42
    image = images_of(studio, first.target_id)[0]
    assert image.size == (64, 64)
    parameters = image.info["parameters"]
    assert parameters.splitlines()[0] == "a lighthouse"
    assert parameters.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 3" in parameters and "Seed: 42" in parameters and "Size: 64x64" in parameters
    assert [s["domain"] for s in result["steps"]] == ["device", "model", "inference"]
    assert result["steps"][2]["data"]["out_of_memory_retry"] is False
    assert query(studio, "SELECT count(*) FROM event_log WHERE type = 'model.loaded'") == [(1,)]
    loads = [json.loads(r[0]) for r in query(studio, "SELECT data FROM event_log WHERE type = 'model.loaded'")]
    assert loads[0]["model_id"] == "tiny" and len(loads[0]["file_hash"]) == 64


def zlib_level_class(png: Path) -> int:
    """The compression class zlib wrote into a PNG's image data (its header's FLEVEL): 0 for
    levels 0-1, 1 for 2-5, 2 for 6, 3 for 7-9."""
    import struct

    data, at = png.read_bytes(), 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            return data[at + 9] >> 6
        at += 12 + length
    raise AssertionError(f"{png} has no image data")


def test_pngs_are_written_at_the_configured_compression_the_same_pixels_at_every_level(studio, models, tmp_path):
    fast = submit(studio, {"workflow": "txt2img", "params": {**SIZE, "prompt": "a lighthouse", "seed": 5}})
    run_until_idle(studio)
    small = Installation(tmp_path / "small", settings={"outbox": {"png_compress_level": 9}})
    ModelRegistry(small.config.models_dir).add(models / "tiny", "tiny")
    smallest = submit(small, {"workflow": "txt2img", "params": {**SIZE, "prompt": "a lighthouse", "seed": 5}})
    run_until_idle(small)
    first, second = (install.config.outbox / session / result_of(install, session)["images"][0]
                     for install, session in ((studio, fast.target_id), (small, smallest.target_id)))
    assert zlib_level_class(first) == 0 and zlib_level_class(second) == 3  # the default, 1; and 9
    assert Image.open(first).tobytes() == Image.open(second).tobytes()
    assert Image.open(first).info["parameters"] == Image.open(second).info["parameters"]
    small.store.close()
    for wrong in (10, -1, "fast", True):
        with pytest.raises(EngineError, match="png_compress_level"):
            Installation(tmp_path / f"wrong-{wrong}", settings={"outbox": {"png_compress_level": wrong}})


# The determinism contract (README): the same seed, params and call composition give bit-identical
# images; across call compositions an image may differ by numerical noise, at most this much.
# Measured on the tiny models on CPU (10 seeds, calls of 1, 2 and 4): at most 1/255, PSNR >= 86 dB.
MAX_CHANNEL_DIFFERENCE = 2
MIN_PSNR_DB = 50.0


def difference(a: Image.Image, b: Image.Image) -> tuple[int, float]:
    """(largest channel difference out of 255, PSNR in dB) between two images of one size."""
    import numpy as np

    delta = np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)
    mse = float((delta.astype(np.float64) ** 2).mean())
    return int(np.abs(delta).max()), (float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse))


def call_of(install, session_id: str) -> tuple[str, int]:
    data = result_of(install, session_id)["steps"][2]["data"]
    return data["call_id"], data["call_images"]


def test_the_same_seed_gives_the_same_image_whatever_ran_beside_it(studio):
    fox = {**SIZE, "prompt": "fox"}
    studio.config.values["batching"]["coalesce"] = False  # first, each session its own call
    alone = submit(studio, {"workflow": "txt2img", "params": {**fox, "seed": 8}}).target_id
    pair = submit(studio, {"workflow": "txt2img", "params": {**fox, "seed": 7, "num_images": 2}}).target_id
    again = submit(studio, {"workflow": "txt2img", "params": {**fox, "seed": 8}}).target_id
    other = submit(studio, {"workflow": "txt2img", "params": {**fox, "seed": 9}}).target_id
    run_until_idle(studio)
    assert [call_of(studio, s)[1] for s in (alone, pair, again, other)] == [1, 2, 1, 1]
    studio.config.values["batching"]["coalesce"] = True  # then four sessions coalesced into one call, twice
    rounds = []
    for _ in range(2):
        rounds.append([submit(studio, {"workflow": "txt2img", "params": {**fox, "seed": seed}}).target_id
                       for seed in (20, 8, 21, 22)])
        run_until_idle(studio)
    for sessions in rounds:
        assert {call_of(studio, s) for s in sessions} == {(call_of(studio, sessions[0])[0], 4)}, "one call of four"
    alone_image = images_of(studio, alone)[0]
    # The same composition: bit-identical.
    assert images_of(studio, again)[0].tobytes() == alone_image.tobytes()
    assert [images_of(studio, s)[0].tobytes() for s in rounds[0]] == [images_of(studio, s)[0].tobytes()
                                                                      for s in rounds[1]]
    # Other compositions (seed 8 as the second image of a call of two, of a call of four): within the bound.
    for image in (images_of(studio, pair)[1], images_of(studio, rounds[0][1])[0]):
        largest, psnr = difference(image, alone_image)
        assert largest <= MAX_CHANNEL_DIFFERENCE and psnr >= MIN_PSNR_DB, (largest, psnr)
    # A different seed is a different picture, far outside that bound.
    largest, psnr = difference(images_of(studio, other)[0], alone_image)
    assert largest > 32 and psnr < 30, (largest, psnr)


def test_img2img_inpaint_controlnet_and_lora(studio):
    common = {**SIZE, "prompt": "a red door", "seed": 1}
    jobs = {
        "img2img": {"workflow": "img2img", "params": {**common, "init_image": "images/start.png", "strength": 0.5}},
        "inpaint": {"workflow": "inpaint", "params": {**common, "init_image": "images/start.png",
                                                      "mask_image": "images/mask.png"}},
        "controlnet": {"workflow": "controlnet", "params": {**common, "controlnet": {
            "model": "cn", "image": "images/start.png", "conditioning_scale": 0.8}}},
        "lora": {"workflow": "txt2img", "params": {**common, "loras": [{"model": "style", "scale": 0.9}]}},
        "plain": {"workflow": "txt2img", "params": common},
    }
    ids = {name: submit(studio, job).target_id for name, job in jobs.items()}
    run_until_idle(studio)
    for name, session_id in ids.items():
        assert status(studio, session_id) == "completed", (name, query(
            studio, "SELECT error_message FROM sessions WHERE session_id = :id", id=session_id))
        assert images_of(studio, session_id)[0].size == (64, 64)
    plain = images_of(studio, ids["plain"])[0].tobytes()
    assert images_of(studio, ids["lora"])[0].tobytes() != plain, "the LoRA changed the picture"
    again = submit(studio, {"workflow": "txt2img", "params": common}).target_id
    run_until_idle(studio)
    assert images_of(studio, again)[0].tobytes() == plain, "the LoRA was removed after its job"
    inpainted = images_of(studio, ids["inpaint"])[0]
    assert inpainted.getpixel((2, 2)) != inpainted.getpixel((32, 32))


def test_sd15_class_pipelines_run_txt2img_and_img2img(studio):
    common = {**SIZE, "model": "tiny15", "prompt": "a lighthouse", "seed": 4}
    plain = submit(studio, {"workflow": "txt2img", "params": common}).target_id
    moved = submit(studio, {"workflow": "img2img", "params": {**common, "init_image": "images/start.png"}}).target_id
    run_until_idle(studio)
    assert status(studio, plain) == status(studio, moved) == "completed"
    assert result_of(studio, plain)["steps"][2]["data"]["model"] == "tiny15"
    assert images_of(studio, moved)[0].size == (64, 64)


def test_the_warm_cache_evicts_the_least_recently_used_under_its_budget(tmp_path, models):
    install = Installation(tmp_path / "engine", settings={
        "handlers": {"modules": ["engine.domains"]}, "models": {"cache_budget_gib": 0.0001},
        "batching": {"coalesce": False}})  # the two 'tiny' sessions would otherwise share one call
    registry = ModelRegistry(install.config.models_dir)
    registry.add(models / "tiny", "tiny")
    registry.add(models / "tiny15", "tiny15")
    for priority, model in ((9, "tiny"), (8, "tiny15"), (7, "tiny")):  # one runner, one cache, in this order
        submit(install, {"workflow": "txt2img", "priority": priority, "params": {**SIZE, "model": model, "prompt": "x"}})
    run_until_idle(install)
    events = [(r[0], json.loads(r[1])["model_id"]) for r in query(
        install, "SELECT type, data FROM event_log WHERE stream_type = 'model' ORDER BY event_id")]
    assert events == [("model.loaded", "tiny"), ("model.unloaded", "tiny"), ("model.loaded", "tiny15"),
                      ("model.unloaded", "tiny15"), ("model.loaded", "tiny")]
    install.store.close()


def test_a_configured_safety_checker_blacks_out_flagged_images(tmp_path, models):
    install = Installation(tmp_path / "engine", settings={
        "handlers": {"modules": ["engine.domains"]}, "safety": {"model": str(models / "safety-strict")}})
    ModelRegistry(install.config.models_dir).add(models / "tiny", "tiny")
    session_id = submit(install, {"workflow": "txt2img", "params": {
        **SIZE, "prompt": "x", "postprocess": [{"op": "safety_check"}]}}).target_id
    run_until_idle(install)
    result = result_of(install, session_id)
    assert result["steps"][-1]["data"]["safety"] == {"flagged": [True]}
    image = images_of(install, session_id)[0]
    assert image.getextrema() == ((0, 0), (0, 0), (0, 0))
    install.store.close()


def test_every_contract_scheduler_runs_by_name(studio):
    names = ["ddim", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "dpm++sde"]
    batch = submit(studio, {"kind": "batch", "workflow": "txt2img", "params": {**SIZE, "prompt": "x", "seed": 3},
                            "items": [{"scheduler": name} for name in names]})
    run_until_idle(studio)
    assert query(studio, "SELECT status, completed_items FROM batch_status") == [("completed", len(names))]
    used = []
    for (session_id,) in query(studio, "SELECT session_id FROM items ORDER BY item_index"):
        output = json.loads(query(studio, "SELECT output FROM steps WHERE session_id = :id AND step_index = 2",
                                  id=session_id)[0][0])
        used.append(output["data"]["scheduler"])
    assert used[0] == "DDIMScheduler" and used[2] == "EulerAncestralDiscreteScheduler"
    assert (studio.config.outbox / "batches" / batch.target_id / "item-00005" / "result.json").exists()


def test_cancel_interrupts_a_long_denoise_mid_way(studio):
    session_id = submit(studio, {"workflow": "txt2img", "params": {
        "width": 256, "height": 256, "steps": 150, "prompt": "slow", "seed": 1}}).target_id
    worker = runner(studio)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True})
    thread.start()
    deadline = time.monotonic() + 60
    def denoised() -> float:  # the denoising step's own progress (its lease), 0 before it runs
        found = query(studio, "SELECT progress FROM leases WHERE session_id = :id AND step_index = 2", id=session_id)
        return found[0][0] if found else 0.0

    while denoised() < 0.05:
        assert time.monotonic() < deadline, "denoising never reported progress"
        time.sleep(0.05)
    commands.control(studio.store, session_id, "cancel")
    cancelled = time.monotonic()
    thread.join(timeout=30)
    assert time.monotonic() - cancelled < 5
    worker.close()
    assert status(studio, session_id) == "cancelled"
    assert query(studio, "SELECT status FROM step_status WHERE session_id = :id AND step_index = 2", id=session_id) == [
        ("cancelled",)]
    assert not list((studio.config.outbox / ".attempts").rglob("*.png")), "the interrupted attempt left no images"


def test_upscale_through_spandrel_and_lanczos_then_enhance(studio):
    with_model = submit(studio, {"workflow": "upscale", "params": {"init_image": "images/start.png", "postprocess": [
        {"op": "upscale", "model": "up", "scale": 2}, {"op": "enhance", "preset": "vivid"}]}}).target_id
    lanczos = submit(studio, {"workflow": "upscale", "params": {"init_image": "images/start.png", "postprocess": [
        {"op": "upscale", "scale": 3}]}}).target_id
    run_until_idle(studio)
    assert images_of(studio, with_model)[0].size == (128, 128)
    assert images_of(studio, lanczos)[0].size == (192, 192)
    assert query(studio, "SELECT count(*) FROM event_log WHERE type = 'model.loaded' AND data LIKE '%\"up\"%'") == [(1,)]
    result = result_of(studio, with_model)
    enhance = result["steps"][-1]["data"]["ops"][1]
    assert {k: v for k, v in enhance.items() if v is not None} == {"op": "enhance", "preset": "vivid"}


def test_hires_workflow_says_plainly_that_no_safety_model_checked_the_images(studio):
    session_id = submit(studio, {"workflow": "txt2img-hires", "params": {**SIZE, "prompt": "castle", "seed": 2}}).target_id
    run_until_idle(studio)
    result = result_of(studio, session_id)
    assert result["status"] == "completed"
    assert images_of(studio, session_id)[0].size == (128, 128)
    assert "NOT checked" in result["steps"][-1]["data"]["safety"]
    assert "Postprocess: safety_check" in images_of(studio, session_id)[0].info["parameters"]


def test_the_hires_fix_denoises_the_upscaled_image_again_as_automatic1111_does(studio):
    """txt2img at the base size, an upscale (hires_upscaler, hires_scale), then img2img at the larger
    size with hires_steps and hires_strength; the image's parameters use A1111's hires keys."""
    params = {**SIZE, "prompt": "castle", "seed": 2, "hires_scale": 1.5, "hires_steps": 2, "hires_strength": 0.6,
              "hires_upscaler": "up"}
    import numpy as np

    session_id = submit(studio, {"workflow": "txt2img-hires", "params": params}).target_id
    run_until_idle(studio)
    result = result_of(studio, session_id)
    assert [s["type"] for s in result["steps"]] == ["device_discovery", "model_loading", "inference_generation",
                                                    "postprocessing_enhancement", "inference_generation",
                                                    "postprocessing_enhancement"]
    second = result["steps"][4]["data"]
    assert second["mode"] == "hires" and second["seeds"] == [2]
    image = images_of(studio, session_id)[0]
    assert image.size == (96, 96)
    fields = dict(A1111_FIELD.findall(image.info["parameters"].splitlines()[-1]))
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"], fields["Denoising strength"]) == (
        "1.5", "2", "up", "0.6")
    assert fields["Size"] == "64x64", "A1111 writes the first pass's size"
    first = studio.config.outbox / session_id
    upscaled = np.asarray(Image.open(next(f for f in first.glob("*-s3.png"))), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - upscaled).mean() > 1, "the second pass changed the upscaled image"
    with pytest.raises(EngineError, match="over limits.max_size"):
        submit(studio, {"workflow": "txt2img-hires", "params": {**params, "width": 1024, "height": 1024,
                                                                 "hires_scale": 4}})


def test_work_that_cannot_fit_is_refused_before_trying(studio):
    session_id = submit(studio, {"workflow": "txt2img", "params": {
        "width": 2048, "height": 2048, "num_images": 16, "steps": 1, "prompt": "huge"}}).target_id
    run_until_idle(studio)
    assert query(studio, "SELECT status, error_code FROM session_status WHERE session_id = :id", id=session_id) == [
        ("failed", "OUT_OF_MEMORY")]
    assert query(studio, "SELECT attempts FROM step_status WHERE session_id = :id AND step_index = 2",
                 id=session_id) == [(1,)], "refused once, not retried"


def test_a_single_file_checkpoint_loads_offline_and_draws_what_its_folder_draws(studio, models, tmp_path):
    """The tiny SD 1.5 pipeline written as one original-format file (the layout shared checkpoints
    come in) and registered with its configs folder: `engine models add --configs-from` on the CLI,
    loaded through from_single_file with no network, gives the folder's pixels for the same seed."""
    from tests.ldm_checkpoint import write_ldm_checkpoint

    single = write_ldm_checkpoint(models / "tiny15", tmp_path / "tiny15-original.safetensors")
    engine_process(studio, "models", "add", str(single), "--id", "tiny15-file", "--configs-from", str(models / "tiny15"))
    row = next(r for r in json.loads(engine_process(studio, "models", "--json")) if r["id"] == "tiny15-file")
    assert (row["kind"], row["format"], row["family"]) == ("pipeline", "safetensors", "sd15")
    assert Path(row["configs_from"]) == (models / "tiny15").resolve()
    params = {**SIZE, "prompt": "a kite", "seed": 21}
    from_file = submit(studio, {"workflow": "txt2img", "params": {**params, "model": "tiny15-file"}}).target_id
    from_folder = submit(studio, {"workflow": "txt2img", "params": {**params, "model": "tiny15"}}).target_id
    ModelRegistry(studio.config.models_dir).add(single, "tiny15-bare")  # no configs: nothing to load it with
    bare = submit(studio, {"workflow": "txt2img", "params": {**params, "model": "tiny15-bare"}}).target_id
    engine_process(studio, "run", "--until-idle", "--quiet", env={"HF_HUB_OFFLINE": "1"})
    assert status(studio, from_file) == status(studio, from_folder) == "completed"
    failure = result_of(studio, bare)["error"]
    assert failure["code"] == "MODEL_LOAD_FAILED" and "--configs-from" in failure["message"]
    file_image, folder_image = images_of(studio, from_file)[0], images_of(studio, from_folder)[0]
    assert file_image.tobytes() == folder_image.tobytes()
    loads = [json.loads(r[0]) for r in query(studio, "SELECT data FROM event_log WHERE type = 'model.loaded'")]
    assert sorted(load["model_id"] for load in loads) == ["tiny15", "tiny15-file"]


def test_a_single_file_checkpoint_is_registered_only_with_a_matching_configs_folder(studio, models, tmp_path):
    from engine.errors import ValidationError
    from tests.ldm_checkpoint import write_ldm_checkpoint

    single = write_ldm_checkpoint(models / "tiny15", tmp_path / "tiny15-original.safetensors")
    registry = ModelRegistry(studio.config.models_dir)
    with pytest.raises(ValidationError, match="sdxl pipeline; the checkpoint is sd15"):
        registry.add(single, "wrong", configs_from=models / "tiny")
    with pytest.raises(ValidationError, match="no model_index.json"):
        registry.add(single, "wrong", configs_from=tmp_path)
    with pytest.raises(ValidationError, match="single-file"):
        registry.add(models / "tiny", "wrong", configs_from=models / "tiny")
    assert "wrong" not in registry.entries()


def test_pickle_models_are_refused_unless_allowed(tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UnsafeModelFormat):
        ModelRegistry(tmp_path / "models").add(pickle, "p")
    entry = ModelRegistry(tmp_path / "models", allow_pickle=True).add(pickle, "p", "upscaler")
    assert entry.format == "pickle"
    with pytest.raises(UnsafeModelFormat):
        ModelRegistry(tmp_path / "models").get("p")


def test_directml_is_preferred_when_present_with_cpu_seeds_and_fp32(monkeypatch, request):
    import torch

    from engine.domains import device

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "standins"))
    request.addfinalizer(lambda: sys.modules.pop("torch_directml", None))  # the stand-in goes with the test
    found = device.discover()
    assert found[0].id == "directml:0" and found[0].name == "Stand-in DirectML Adapter"
    chosen = device.select("auto", found)
    assert chosen.kind == "directml"
    assert device.dtype_for(chosen) == torch.float32
    assert device.generator_device(chosen) == "cpu"
    assert device.select("cpu", found).id == "cpu"
    with pytest.raises(Exception, match="DEVICE_UNAVAILABLE|not available"):
        device.select("cuda:3", found)


def run_capped(install, headroom_mib: int) -> None:
    """A real runner process whose address space is capped (by the capped workflow's cap step) at
    what it uses after loading the model plus headroom_mib, so large allocations really fail.
    One malloc arena with a fixed mmap threshold keeps the address space the allocations take
    close to their size, and one OpenMP thread keeps libgomp from starting (and, failing to
    start, aborting on) threads under the cap."""
    engine_process(install, "run", "--until-idle", "--quiet", env={
        "ENGINE_TEST_HEADROOM_MIB": str(headroom_mib), "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="caps the address space through /proc")
def test_out_of_memory_inside_a_step_retries_one_image_at_a_time_then_fails_plainly(studio):
    """Sixteen 192x192 images need more than 220 MiB above the loaded model; one needs less than 80
    after a fresh start, and more than 70 once the sixteen have failed (all measured). Under a 150
    MiB cap the sixteen really fail to allocate, and the step frees caches and makes the images one
    at a time; under a 55 MiB cap even one fails, and the session fails with OUT_OF_MEMORY (55, not
    less: the runner's own bookkeeping needs room too; at 20, and once in a few hundred runs at 40,
    the capped process was seen to die before it could record the failure)."""
    job = {"workflow": "txt2img-capped", "params": {"prompt": "oom", "seed": 11, "num_images": 16, "width": 192,
                                                     "height": 192, "steps": 2, "guidance_scale": 5.0}}
    fits_singly = submit(studio, job).target_id
    run_capped(studio, headroom_mib=150)
    result = result_of(studio, fits_singly)
    assert result["status"] == "completed", result["error"]
    assert result["images"] == [f"{n:05d}-{11 + n}.png" for n in range(16)]
    generation = result["steps"][3]
    assert generation["type"] == "inference_generation" and generation["data"]["out_of_memory_retry"] is True
    assert [Image.open(studio.config.outbox / fits_singly / name).size for name in result["images"]] == [(192, 192)] * 16

    never_fits = submit(studio, job).target_id
    run_capped(studio, headroom_mib=55)
    result = result_of(studio, never_fits)
    assert result["status"] == "failed" and result["error"]["code"] == "OUT_OF_MEMORY"
    assert "even one image at a time" in result["error"]["message"]
    assert result["images"] == []


def test_a_session_runs_end_to_end_on_the_directml_path(studio):
    """A real runner process whose torch_directml is the stand-in: the session records directml:0."""
    session_id = submit(studio, {"workflow": "txt2img", "params": {**SIZE, "prompt": "dml", "seed": 5}}).target_id
    standins = str(ROOT / "tests" / "standins") + ":" + studio.env()["PYTHONPATH"]
    engine_process(studio, "run", "--until-idle", "--quiet", env={"PYTHONPATH": standins})
    result = result_of(studio, session_id)
    assert result["status"] == "completed"
    assert result["steps"][0]["data"]["device"] == "directml:0"
    assert result["steps"][2]["data"]["dtype"] == "float32"


@pytest.mark.slow
def test_engine_demo_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "engine", "demo", "--folder", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RANDOM WEIGHTS" in done.stdout
    outbox = tmp_path / "demo" / "outbox"
    results = [json.loads(p.read_text()) for p in outbox.rglob("result.json")]
    assert sorted(r["status"] for r in results).count("completed") == 8
    assert [r["status"] for r in results].count("cancelled") == 1
    assert (outbox / "contact-sheet.png").exists()


def test_a_batch_runs_its_items_in_shared_calls_with_metrics_and_a_labelled_contact_sheet(studio):
    batch_id = submit(studio, {"kind": "batch", "workflow": "txt2img", "params": {**SIZE, "prompt": "owl"},
                               "matrix": {"product": {"seed": [3, 4, 5, 6, 7]}},
                               "batch": {"preferred_batch_size": 2, "max_batch_size": 4}}).target_id
    run_until_idle(studio)
    (status, total, completed, images, average, rate, remaining), = query(
        studio, "SELECT status, total_batches, completed_batches, total_images_generated, average_batch_time, "
                "images_per_second, estimated_time_remaining FROM batch_status WHERE batch_id = :b", b=batch_id)
    assert (status, total, completed, images, remaining) == ("completed", 3, 3, 5, 0)
    assert average > 0 and rate > 0
    folder = studio.config.outbox / "batches" / batch_id
    sizes = sorted(json.loads((folder / f"item-{n:05d}" / "result.json").read_text())["steps"][2]["data"]["call_images"]
                   for n in range(5))
    assert sizes == [1, 2, 2, 2, 2]
    sheet = Image.open(folder / "contact-sheet.png")
    assert sheet.size == (5 * 128, 128 + 14)
    assert len(set(sheet.crop((0, 128, 640, 142)).getdata())) > 1, "the labels are drawn under the tiles"


def test_a_lora_or_controlnet_of_another_family_is_refused_at_submit(studio):
    """Refused when the file is taken, naming both families, instead of failing three times at run time."""

    inbox = studio.config.inbox
    jobs = {
        "lora.json": {"workflow": "txt2img", "params": {**SIZE, "model": "tiny", "loras": [{"model": "style15"}]}},
        "controlnet.json": {"workflow": "controlnet", "params": {**SIZE, "model": "tiny15", "controlnet": {
            "model": "cn", "image": "images/start.png"}}},
        "fits.json": {"workflow": "txt2img", "params": {**SIZE, "model": "tiny15", "loras": [{"model": "style15"}]}},
    }
    for name, job in jobs.items():
        (inbox / name).write_text(json.dumps(job))
        os.utime(inbox / name, (0, 0))
    outcomes = {o.file_name: o for o in studio.engine.inbox().scan()}
    assert outcomes["fits.json"].accepted
    lora, controlnet = outcomes["lora.json"], outcomes["controlnet.json"]
    assert lora.code == controlnet.code == "VALIDATION_ERROR"
    assert "'style15'" in lora.message and "'tiny' is sdxl" in lora.message and "width 16" in lora.message
    assert "'cn' is for sdxl" in controlnet.message and "'tiny15' is sd15" in controlnet.message
    listed = {m["id"]: m for m in json.loads(engine_process(studio, "models", "--json"))}
    assert (listed["tiny"]["family"], listed["tiny15"]["family"], listed["cn"]["family"]) == ("sdxl", "sd15", "sdxl")
    assert (listed["style"]["context_dim"], listed["style15"]["context_dim"]) == (32, 16)


def test_a_lora_that_does_not_fit_at_run_time_fails_at_once(studio):
    """A registry entry from before the family check (no width recorded) still fails at once, not
    three times: a size mismatch will repeat."""
    index = studio.config.models_dir / "registry.json"
    entries = json.loads(index.read_text())
    entries["style15"].update(context_dim=0, family="")
    index.write_text(json.dumps(entries))
    session_id = submit(studio, {"workflow": "txt2img", "params": {**SIZE, "model": "tiny",
                                                                    "loras": [{"model": "style15"}]}}).target_id
    run_until_idle(studio)
    (step_status, attempts, message), = query(
        studio, "SELECT status, attempts, error_message FROM steps WHERE session_id = :id AND status = 'failed'",
        id=session_id)
    assert attempts == 1 and "not retried" in message, message


# AUTOMATIC1111's own reader of the parameters line (modules/infotext_utils.py, re_param).
A1111_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_the_a1111_parameters_name_the_real_sampler_the_hashes_and_loras_as_a1111_writes_them(studio):
    plain = submit(studio, {"workflow": "txt2img", "params": {**SIZE, "prompt": "a fox", "seed": 1}})
    styled = submit(studio, {"workflow": "txt2img", "params": {
        **SIZE, "prompt": "a fox", "seed": 1, "scheduler": "euler_a", "loras": [{"model": "style", "scale": 0.5}]}})
    run_until_idle(studio)

    def fields(session_id):
        lines = images_of(studio, session_id)[0].info["parameters"].splitlines()
        return lines[0], {k: json.loads(v) if v.startswith('"') else v for k, v in A1111_FIELD.findall(lines[-1])}

    prompt, found = fields(plain.target_id)
    assert found["Sampler"] == "Euler" and "default" not in found.values(), "the model's own sampler, by A1111's name"
    assert re.fullmatch(r"[0-9a-f]{10}", found["Model hash"]) and found["Model"] == "tiny"
    assert {"Steps", "CFG scale", "Seed", "Size", "Workflow mode"} <= set(found)
    prompt, found = fields(styled.target_id)
    assert prompt == "a fox <lora:style:0.5>" and found["Sampler"] == "Euler a"
    assert re.fullmatch(r"style: [0-9a-f]{12}", found["Lora hashes"])


def test_engine_session_shows_the_job_the_prompt_the_params_and_the_image_files(studio):
    made = submit(studio, {"job_id": "look-1", "workflow": "txt2img", "params": {
        **SIZE, "prompt": "a lighthouse on a cliff", "seed": 8, "num_images": 2, "guidance_scale": 5.5}})
    run_until_idle(studio)
    shown = engine_process(studio, "session", "look-1")
    assert made.target_id in shown and "(job look-1)" in shown and "step 3/3" in shown
    assert "prompt: a lighthouse on a cliff" in shown and "guidance_scale=5.5" in shown and "num_images=2" in shown
    folder = studio.config.outbox / made.target_id
    assert str(folder / "00000-8.png") in shown and str(folder / "00001-9.png") in shown


def test_a_job_can_use_a_registered_vae_instead_of_its_models_own(studio, models, tmp_path):
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    registry = ModelRegistry(studio.config.models_dir)
    registry.add(models / "tiny" / "vae", "same-vae")
    other = AutoencoderKL.from_pretrained(models / "tiny" / "vae")
    with torch.no_grad():
        other.decoder.conv_out.weight.mul_(0.25)
    other.save_pretrained(tmp_path / "dim-vae", safe_serialization=True)
    registry.add(tmp_path / "dim-vae", "dim-vae")
    job = {"workflow": "txt2img", "params": {**SIZE, "prompt": "a fox", "seed": 4}}
    own = submit(studio, job).target_id
    same = submit(studio, {**job, "params": {**job["params"], "vae": "same-vae"}}).target_id
    dim = submit(studio, {**job, "params": {**job["params"], "vae": "dim-vae"}}).target_id
    run_until_idle(studio)
    pictures = {s: np.asarray(images_of(studio, s)[0], dtype=np.int16) for s in (own, same, dim)}
    assert np.abs(pictures[own] - pictures[same]).max() <= 1, "the same weights through the job's VAE: the same image"
    assert np.abs(pictures[own] - pictures[dim]).mean() > 2, "another VAE decodes another image"
    assert "VAE: dim-vae" in images_of(studio, dim)[0].info["parameters"]
    with pytest.raises(EngineError, match="unknown vae model 'nope'"):
        submit(studio, {**job, "params": {**job["params"], "vae": "nope"}})


def test_img2img_and_inpaint_that_would_denoise_no_step_are_refused_at_submit_naming_the_minimum(studio):
    for workflow, extra in (("img2img", {}), ("inpaint", {"mask_image": "images/mask.png"})):
        with pytest.raises(EngineError) as refused:
            submit(studio, {"workflow": workflow, "params": {**SIZE, "steps": 5, "strength": 0.1, "prompt": "x",
                                                             "init_image": "images/start.png", **extra}})
        assert refused.value.code == "VALIDATION_ERROR" and "params.strength" in refused.value.message
        assert "strength at least 0.2 or at least 10 steps" in refused.value.message
    accepted = submit(studio, {"workflow": "img2img", "params": {**SIZE, "steps": 5, "strength": 0.2, "prompt": "x",
                                                                 "init_image": "images/start.png"}}).target_id
    run_until_idle(studio)
    assert status(studio, accepted) == "completed"
    assert result_of(studio, accepted)["steps"][2]["data"]["denoising_steps"] == 1


def test_the_hires_pass_runs_exactly_hires_steps_at_any_strength_as_automatic1111_does(studio):
    from engine.domains.inference import denoising_steps, hires_schedule

    assert all(denoising_steps(hires_schedule(steps, strength / 100), strength / 100) == steps
               for steps in range(1, 151) for strength in range(1, 101))
    session_id = submit(studio, {"workflow": "txt2img-hires", "params": {
        **SIZE, "prompt": "castle", "seed": 3, "hires_scale": 1.0, "hires_steps": 2, "hires_strength": 0.4}}).target_id
    run_until_idle(studio)
    assert status(studio, session_id) == "completed"
    assert result_of(studio, session_id)["steps"][4]["data"]["denoising_steps"] == 2
    with pytest.raises(EngineError) as refused:
        submit(studio, {"workflow": "txt2img-hires", "params": {**SIZE, "hires_steps": 150, "hires_strength": 0.01}})
    assert "params.hires_strength" in refused.value.message and "schedule of 15000 steps" in refused.value.message


def test_an_input_image_swapped_while_its_job_waits_is_refused_at_the_step_not_retried(studio):
    images = studio.config.inbox / "images"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "held.png")
    session_id = submit(studio, {"workflow": "img2img", "hold": True, "params": {
        **SIZE, "prompt": "x", "init_image": "images/held.png", "strength": 0.7}}).target_id
    Image.new("RGB", (3000, 3000), (9, 9, 9)).save(images / "held.png")  # swapped while held
    commands.control(studio.store, session_id, "resume")
    run_until_idle(studio)
    assert status(studio, session_id) == "failed"
    step = query(studio, "SELECT attempts, error_code FROM step_status WHERE session_id = :s AND status = 'failed'",
                 s=session_id)
    assert step == [(1, "VALIDATION_ERROR")], "refused, not retried"
    message = query(studio, "SELECT error_message FROM sessions WHERE session_id = :s", s=session_id)[0][0]
    assert "params.init_image" in message and "changed after the job was submitted" in message


def _denoise_under_way(studio, seed: int, command: tuple[str, ...] = ("run", "--quiet"),
                       stdin=None) -> tuple[str, subprocess.Popen]:
    """A 150-step job and an `engine run` (or another hosting command) that has started its denoise.
    Long enough (seconds, not a fraction of one) that a stop lands mid-denoise on a loaded machine."""
    session_id = submit(studio, {"workflow": "txt2img", "params": {
        "prompt": "a long one", "width": 160, "height": 160, "steps": 150, "seed": seed}}).target_id
    process = subprocess.Popen([sys.executable, "-m", "engine", *command], cwd=studio.folder, env=studio.env(),
                               stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not query(studio, "SELECT count(*) FROM leases WHERE session_id = :s AND message LIKE 'denoising%'",
                    s=session_id)[0][0]:
        assert time.monotonic() < deadline and process.poll() is None, "the denoise never started"
        time.sleep(0.05)
    return session_id, process


def test_ctrl_c_in_a_real_denoise_stops_at_the_next_denoising_step_and_the_job_completes_later(studio):
    import signal as signals

    session_id, process = _denoise_under_way(studio, seed=5)
    process.send_signal(signals.SIGINT)
    started = time.monotonic()
    _, logged = process.communicate(timeout=60)
    assert process.returncode == 0 and time.monotonic() - started < 20, logged
    assert "SIGINT: stopping" in logged and "terminate called" not in logged and "Traceback" not in logged
    released = [e.data["reason"] for e in studio.store.stream("session", session_id) if e.type == "step.released"]
    assert released == ["stopping"]
    assert query(studio, "SELECT status, attempts FROM steps WHERE session_id = :s AND step_index = 2",
                 s=session_id) == [("pending", 0)]
    run_until_idle(studio)
    assert status(studio, session_id) == "completed"
    assert query(studio, "SELECT attempts FROM steps WHERE session_id = :s AND step_index = 2", s=session_id) == [(1,)]


def test_sigterm_to_the_stdio_worker_mid_denoise_hands_the_step_back_unused_and_exits_cleanly(studio):
    """The stdio worker is hosted as `engine run` is: SIGTERM while its client still has the pipe
    open stops the denoise at its next step, hands the step back with its attempt unused, exits 0."""
    import signal as signals

    session_id, process = _denoise_under_way(studio, seed=7, command=("worker", "--stdio", "--runner-id", "piped"),
                                             stdin=subprocess.PIPE)
    process.send_signal(signals.SIGTERM)
    started = time.monotonic()
    try:
        logged = process.stderr.read()
        process.wait(timeout=60)
    finally:
        process.stdin.close()
    assert process.returncode == 0 and time.monotonic() - started < 20, logged
    assert "SIGTERM: stopping" in logged and "Traceback" not in logged
    released = [e.data["reason"] for e in studio.store.stream("session", session_id) if e.type == "step.released"]
    assert released == ["stopping"]
    assert query(studio, "SELECT status, attempts FROM steps WHERE session_id = :s AND step_index = 2",
                 s=session_id) == [("pending", 0)]
    assert query(studio, "SELECT status FROM runner_status WHERE runner_id = 'piped'") == [("stopped",)]
    run_until_idle(studio)
    assert status(studio, session_id) == "completed"


def test_ctrl_c_reaches_a_running_denoise_while_another_program_holds_the_database_write_lock(studio):
    """The stop must not wait for a database round trip: with the write lock held elsewhere, the
    runner's lease renewal waits, yet Ctrl-C stops the denoise at its next step (the process goes
    idle while the lock is still held); once the lock is free the step is handed back, unused."""
    import signal as signals
    import sqlite3

    import psutil

    session_id, process = _denoise_under_way(studio, seed=6)
    holder = sqlite3.connect(studio.config.path("database"), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the runner's next lease renewal waits for it
        busy = psutil.Process(process.pid)
        busy.cpu_percent(None)
        time.sleep(1.5)
        denoising = busy.cpu_percent(None)
        process.send_signal(signals.SIGINT)
        time.sleep(2.0)  # a denoising step of this size takes a fraction of a second
        busy.cpu_percent(None)
        time.sleep(1.5)
        after_stop = busy.cpu_percent(None)
        assert process.poll() is None, "it waits for the lock to hand the step back"
    finally:
        holder.rollback()
        holder.close()
    _, logged = process.communicate(timeout=60)
    assert denoising > 60 and after_stop < 25, (denoising, after_stop, logged)
    assert process.returncode == 0 and "SIGINT: stopping" in logged and "Traceback" not in logged, logged
    released = [e.data["reason"] for e in studio.store.stream("session", session_id) if e.type == "step.released"]
    assert released == ["stopping"]
    assert query(studio, "SELECT status, attempts FROM steps WHERE session_id = :s AND step_index = 2",
                 s=session_id) == [("pending", 0)]
