"""Model families (engine.domains.families): tiny FLUX.1 (dev and schnell), SD 3.5 and Z-Image
pipelines built in code, registered and run through the real loading and generation code, and the
submit-time checks each family makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from engine.domains.catalogue import ModelRegistry
from engine.domains.families import known, nearest_on_grid
from engine.errors import ValidationError
from tests.conftest import Installation
from tests.helpers import query, run_until_idle, status, submit

import transformers

pytestmark = [pytest.mark.domains, pytest.mark.slow, pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="the tiny FLUX, SD 3.5 and Z-Image builders take their tokenizers' vocabularies as data, which needs "
           "transformers 5; the DirectML extra's older stack runs SD 1.5 and SDXL")]

SIZE = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from engine.domains.tinymodels import (build_tiny_flux, build_tiny_flux_lora, build_tiny_lora, build_tiny_sd3,
                                           build_tiny_sdxl, build_tiny_zimage)

    folder = tmp_path_factory.mktemp("family-models")
    build_tiny_flux(folder / "flux-dev")
    build_tiny_flux(folder / "flux-schnell", schnell=True)
    build_tiny_sd3(folder / "sd35")
    build_tiny_zimage(folder / "zimage")
    build_tiny_sdxl(folder / "sdxl")
    build_tiny_flux_lora(folder / "flux-style.safetensors", folder / "flux-dev")
    build_tiny_lora(folder / "sdxl-style.safetensors", folder / "sdxl")
    return folder


@pytest.fixture
def studio(tmp_path, models) -> Installation:
    install = Installation(tmp_path / "engine", settings={"handlers": {"modules": ["engine.domains"]},
                                                          "limits": {"max_steps": 1000}})
    registry = ModelRegistry(install.config.models_dir)
    for name in ("flux-dev", "flux-schnell", "sd35", "zimage", "sdxl"):
        registry.add(models / name, name)
    registry.add(models / "flux-style.safetensors", "flux-style")
    registry.add(models / "sdxl-style.safetensors", "sdxl-style")
    images = install.config.inbox / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (64, 64), (40, 90, 200)).save(images / "start.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(images / "mask.png")
    yield install
    install.store.close()


def result_of(install, session_id: str) -> dict:
    return json.loads((install.config.outbox / session_id / "result.json").read_text())


def refused(install, job: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        submit(install, job)
    return str(caught.value)


def test_each_family_is_recognised_from_its_folder_with_its_variant(studio):
    entries = ModelRegistry(studio.config.models_dir).entries()
    found = {name: (entries[name].family, entries[name].variant) for name in
             ("flux-dev", "flux-schnell", "sd35", "zimage", "sdxl")}
    assert found == {"flux-dev": ("flux", ""), "flux-schnell": ("flux", "schnell"), "sd35": ("sd3", ""),
                     "zimage": ("zimage", ""), "sdxl": ("sdxl", "")}
    assert (entries["flux-style"].kind, entries["flux-style"].family) == ("lora", "flux")
    assert set(known()) >= {"sd15", "sdxl", "sd3", "flux", "zimage"}


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell", "sd35", "zimage"])
def test_every_mode_of_each_new_family_runs_through_the_real_pipelines(studio, model):
    base = {**SIZE, "model": model, "prompt": "a lighthouse", "seed": 7}
    jobs = {"txt2img": {"workflow": "txt2img", "params": base},
            "img2img": {"workflow": "img2img", "params": {**base, "steps": 4, "init_image": "images/start.png"}},
            "inpaint": {"workflow": "inpaint", "params": {**base, "steps": 4, "init_image": "images/start.png",
                                                          "mask_image": "images/mask.png"}},
            "hires": {"workflow": "txt2img-hires", "params": {**base, "hires_scale": 1.4, "hires_steps": 2}}}
    ids = {mode: submit(studio, job).target_id for mode, job in jobs.items()}
    run_until_idle(studio)
    for mode, session_id in ids.items():
        assert status(studio, session_id) == "completed", (mode, result_of(studio, session_id).get("error"))
        result = result_of(studio, session_id)
        generation = [s for s in result["steps"] if s["type"] == "inference_generation"][-1]["data"]
        assert (generation["model"], generation["mode"]) == (model, mode)
        picture = Image.open(studio.config.outbox / session_id / result["images"][0])
        # hires: 64 x 1.4 = 89.6, down to the grid: 88 for the UNets, 80 for the transformers (16)
        assert picture.size == ((80, 80) if mode == "hires" else (64, 64))
        assert "Steps:" in picture.text["parameters"] and f"Model: {model}" in picture.text["parameters"]


def test_a_family_fills_in_its_own_defaults_and_schnell_takes_no_guidance(studio):
    schnell = submit(studio, {"workflow": "txt2img", "params": {"model": "flux-schnell", "prompt": "x",
                                                                "width": 64, "height": 64}}).target_id
    dev = submit(studio, {"workflow": "txt2img", "params": {"model": "flux-dev", "prompt": "x",
                                                            "width": 64, "height": 64}}).target_id
    stored = {sid: json.loads(query(studio, "SELECT params FROM sessions WHERE session_id = :sid", sid=sid)[0][0])
              for sid in (schnell, dev)}
    assert (stored[schnell]["steps"], stored[schnell]["guidance_scale"]) == (4, 0.0)
    assert (stored[dev]["steps"], stored[dev]["guidance_scale"]) == (28, 3.5)
    message = refused(studio, {"workflow": "txt2img", "params": {**SIZE, "model": "flux-schnell", "prompt": "x",
                                                                 "guidance_scale": 3.5}})
    assert "guidance_scale" in message and "schnell" in message


def test_submit_refuses_what_a_family_cannot_run_naming_what_it_can(studio):
    job = {"workflow": "txt2img", "params": {**SIZE, "model": "flux-dev", "prompt": "x"}}
    off_grid = refused(studio, {**job, "params": {**job["params"], "width": 72}})
    assert "multiples of 16" in off_grid and "nearest valid size is 80" in off_grid
    scheduler = refused(studio, {**job, "params": {**job["params"], "scheduler": "dpm++2m"}})
    assert "dpm++2m" in scheduler and "euler" in scheduler
    negative = refused(studio, {**job, "params": {**job["params"], "negative_prompt": "blurry"}})
    assert "negative prompt" in negative
    lora = refused(studio, {**job, "params": {**job["params"], "loras": [{"model": "sdxl-style"}]}})
    assert "sdxl-style" in lora and "flux" in lora
    other_way = refused(studio, {"workflow": "txt2img", "params": {**SIZE, "model": "sdxl", "prompt": "x",
                                                                   "loras": [{"model": "flux-style"}]}})
    assert "flux-style" in other_way
    zimage = refused(studio, {"workflow": "txt2img", "params": {**SIZE, "model": "zimage", "prompt": "x",
                                                                "negative_prompt": "blurry"}})
    assert "guidance_scale above 1" in zimage
    # The same job the families refuse, with what they named, is taken.
    submit(studio, {**job, "params": {**job["params"], "width": 80, "scheduler": "euler"}})
    submit(studio, {"workflow": "txt2img", "params": {**SIZE, "model": "zimage", "prompt": "x",
                                                      "negative_prompt": "blurry", "guidance_scale": 3.0}})
    assert nearest_on_grid(72, 16) == 80 and nearest_on_grid(70, 16) == 64 and nearest_on_grid(3, 16) == 16


def test_two_flux_jobs_share_one_call_and_a_flux_lora_changes_the_picture(studio):
    params = {**SIZE, "model": "flux-dev", "guidance_scale": 3.5}
    first = submit(studio, {"workflow": "txt2img", "params": {**params, "prompt": "a cat", "seed": 1}}).target_id
    second = submit(studio, {"workflow": "txt2img", "params": {**params, "prompt": "a dog", "seed": 2}}).target_id
    styled = submit(studio, {"workflow": "txt2img", "params": {**params, "prompt": "a cat", "seed": 1,
                                                               "loras": [{"model": "flux-style", "scale": 1.0}]}}).target_id
    run_until_idle(studio)
    data = {sid: next(s for s in result_of(studio, sid)["steps"] if s["type"] == "inference_generation")["data"]
            for sid in (first, second, styled)}
    assert data[first]["call_id"] == data[second]["call_id"] and data[first]["call_sessions"] == 2
    assert data[styled]["call_id"] != data[first]["call_id"]
    plain = Image.open(studio.config.outbox / first / result_of(studio, first)["images"][0])
    with_lora = Image.open(studio.config.outbox / styled / result_of(studio, styled)["images"][0])
    assert plain.tobytes() != with_lora.tobytes()


def test_the_family_table_in_the_docs_is_what_the_family_modules_say():
    from tests.conftest import ROOT

    rows = {}
    for line in (ROOT / "docs" / "families.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells
    families = known()
    assert set(rows) == set(families)
    for name, cells in rows.items():
        family = families[name]
        assert cells[3] == ", ".join(family.modes), name
        assert (int(cells[4]), int(cells[5])) == (family.size_multiple, family.native_size), name
        assert cells[6].split()[0] == str(family.steps), name
        assert ("LoRAs: " + cells[10]) == ("LoRAs: " + ("yes" if family.loras else "no")), name


def test_flux_through_automatic1111_as_forge_and_openai_images(tmp_path, models):
    """The real webuiapi client (its default cfg_scale 7 and sampler "Euler a") runs FLUX.1 schnell,
    which takes no guidance, and dev with Forge's distilled_cfg_scale; the openai client runs SD 3.5."""
    import base64
    import io

    import openai
    import webuiapi

    from tests.served import Served

    install = Installation(tmp_path / "engine")
    for name in ("flux-schnell", "flux-dev", "sd35"):
        install.engine.models.add(models / name, name)
    server = Served(install)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, steps=2)
        made = api.txt2img(prompt="a fox", width=64, height=64, seed=5,
                           override_settings={"sd_model_checkpoint": "flux-schnell"})
        assert made.image.size == (64, 64) and "Model: flux-schnell" in made.info["infotexts"][0]
        import httpx  # as Forge's clients send it: distilled_cfg_scale beside webuiapi's own fields

        dev = httpx.post(f"http://127.0.0.1:{server.port}/sdapi/v1/txt2img", timeout=120, json={
            "prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 5, "cfg_scale": 7,
            "distilled_cfg_scale": 2.5, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "flux-dev"}})
        assert dev.status_code == 200, dev.text
        assert "CFG scale: 2.5" in json.loads(dev.json()["info"])["infotexts"][0]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
        answer = client.images.generate(model="sd35", prompt="a fox", size="64x64", response_format="b64_json")
        assert Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).size == (64, 64)
    finally:
        server.stop()
        install.engine.close()


def test_flux_and_sd35_through_the_cli_and_stdio_and_a_family_refusal_alike_at_every_door(studio):
    """A FLUX.1 schnell job file through `engine submit`, an SD 3.5 one through the stdio worker, both
    made by a real `engine run`; one job the family refuses (a negative prompt on FLUX.1) refused
    alike by the CLI (exit 2), the stdio worker and the HTTP door (422), and nothing recorded."""
    import subprocess
    import sys

    import httpx

    from tests.served import Served
    from tests.test_house import _stdio

    flux = {"workflow": "txt2img", "params": {"width": 64, "height": 64, "model": "flux-schnell", "prompt": "from a file",
                                              "seed": 3}}
    (studio.folder / "flux.json").write_text(json.dumps(flux))
    cli = subprocess.run([sys.executable, "-m", "engine", "submit", "flux.json", "--json"], env=studio.env(),
                         cwd=studio.folder, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    flux_id = json.loads(cli.stdout)[0]["target_id"]
    sd35 = {**SIZE, "model": "sd35", "prompt": "from stdio", "negative_prompt": "blurry", "seed": 4}
    answers = _stdio(studio, {"type": "execute_workflow", "request_id": "s", "data": {"workflow_id": "txt2img",
                                                                                       "parameters": sd35}})
    assert answers["s"]["success"] is True, answers
    sd35_id = answers["s"]["data"]["session_id"]
    ran = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], env=studio.env(),
                         cwd=studio.folder, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    for session_id, model in ((flux_id, "flux-schnell"), (sd35_id, "sd35")):
        result = result_of(studio, session_id)
        assert result["status"] == "completed", result.get("error")
        picture = Image.open(studio.config.outbox / session_id / result["images"][0])
        assert picture.size == (64, 64) and f"Model: {model}" in picture.text["parameters"]
    assert "Negative prompt: blurry" in Image.open(
        studio.config.outbox / sd35_id / result_of(studio, sd35_id)["images"][0]).text["parameters"]
    assert result_of(studio, flux_id)["params"]["steps"] == 4  # schnell's own default, through the CLI too

    before = query(studio, "SELECT COUNT(*) FROM sessions")[0][0]
    bad = {"workflow": "txt2img", "params": {**SIZE, "model": "flux-dev", "prompt": "x", "negative_prompt": "blurry"}}
    (studio.folder / "bad.json").write_text(json.dumps(bad))
    cli_refusal = subprocess.run([sys.executable, "-m", "engine", "submit", "bad.json", "--json"], env=studio.env(),
                                 cwd=studio.folder, capture_output=True, text=True, timeout=120)
    stdio_refusal = _stdio(studio, {"type": "execute_workflow", "request_id": "x",
                                    "data": {"workflow_id": "txt2img", "parameters": bad["params"]}})["x"]
    served = Served(studio, "--no-runner")
    try:
        http_refusal = httpx.post(f"{served.url}/v1/jobs", json=bad)
    finally:
        served.stop()
    assert cli_refusal.returncode == 2 and stdio_refusal["success"] is False and http_refusal.status_code == 422
    refusals = [json.loads(cli_refusal.stdout)[0], stdio_refusal["error"], http_refusal.json()]
    assert {(r["code"], r["message"]) for r in refusals} == {("VALIDATION_ERROR", refusals[0]["message"])}
    assert "negative prompt" in refusals[0]["message"] and "FLUX.1" in refusals[0]["message"]
    assert query(studio, "SELECT COUNT(*) FROM sessions")[0][0] == before


def test_the_submit_form_shows_what_the_chosen_models_family_uses_and_its_defaults(tmp_path, models):
    """In a real browser: choosing FLUX.1 schnell hides the negative prompt and the guidance (and
    sends neither), shows its 4 steps and 1024 px as the defaults and only its Euler; choosing
    SD 3.5 shows the negative prompt again with its 28 steps; the schnell job submitted from the
    form completes with its picture."""
    import httpx

    from tests.served import Served
    from tests.test_web import chromium_path

    playwright_api = pytest.importorskip("playwright.sync_api")
    if chromium_path() is None:
        import os

        if os.environ.get("ENGINE_TEST_REQUIRE_BROWSER"):
            pytest.fail("no chromium found, and ENGINE_TEST_REQUIRE_BROWSER is set")
        pytest.skip("no chromium: apt-get install -y chromium")
    install = Installation(tmp_path / "engine")
    for name in ("sdxl", "flux-schnell", "sd35"):
        install.engine.models.add(models / name, name)
    server = Served(install)
    errors: list[str] = []
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/submit")
            negative, guidance = page.get_by_label("Negative Prompt"), page.get_by_label("Guidance Scale")
            steps, width = page.get_by_label("Steps", exact=True), page.get_by_label("Width")
            page.locator("#p-model").select_option("sdxl")
            assert negative.is_visible() and guidance.is_visible()
            negative.fill("blurry")
            page.get_by_label("Prompt", exact=True).fill("a fox in the snow")
            page.locator("#p-model").select_option("flux-schnell")
            assert not negative.is_visible() and not guidance.is_visible()
            assert (steps.get_attribute("placeholder"), width.get_attribute("placeholder")) == ("4", "1024")
            assert width.get_attribute("step") == "16"
            schedulers = page.locator("#p-scheduler option:not([disabled])").evaluate_all("os => os.map(o => o.value)")
            assert schedulers == ["", "euler"]
            assert "FLUX.1 schnell" in page.locator("#model-family").inner_text()
            preview = json.loads(page.locator("#job-preview").inner_text())
            assert "negative_prompt" not in preview["params"] and preview["params"]["model"] == "flux-schnell"
            page.locator("#p-model").select_option("sd35")
            assert negative.is_visible() and steps.get_attribute("placeholder") == "28"
            assert json.loads(page.locator("#job-preview").inner_text())["params"]["negative_prompt"] == "blurry"
            page.locator("#p-model").select_option("flux-schnell")
            width.fill("64")
            page.get_by_label("Height").fill("64")
            page.get_by_role("button", name="Submit").click()
            page.locator('#submit-result .status-line[data-status="completed"]').wait_for(timeout=180_000)
            page.wait_for_function("() => document.querySelector('#submit-result img.result')?.naturalWidth > 0",
                                   timeout=60_000)
            session_id = page.locator("#submit-result h2 a").get_attribute("href").rsplit("/", 1)[1]
            browser.close()
        report = httpx.get(f"{server.url}/v1/sessions/{session_id}").json()
        assert report["params"]["model"] == "flux-schnell" and report["params"]["steps"] == 4
        assert not report["params"].get("negative_prompt")
    finally:
        server.stop()
        install.engine.close()
    assert errors == []


def test_a_flux_session_killed_mid_denoise_is_recovered_with_the_picture_an_unbroken_run_makes(studio):
    """SIGKILL of a real `engine run` while a FLUX.1 denoise is under way: the next runner takes the
    step back once its lease runs out and makes it again; the session completes once, with the
    same picture (same seed) as the same job run without a kill, and the store verifies."""
    import signal
    import subprocess
    import sys
    import time

    job = {"workflow": "txt2img", "params": {"model": "flux-dev", "prompt": "a long one", "width": 64, "height": 64,
                                             "steps": 400, "seed": 11}}
    killed = submit(studio, job).target_id
    env = {**studio.env(), "ENGINE_RUNNER_LEASE_SECONDS": "1.0", "ENGINE_RUNNER_HEARTBEAT_SECONDS": "0.2"}
    process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet"], cwd=studio.folder, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not query(studio, "SELECT count(*) FROM leases WHERE session_id = :s AND message LIKE 'denoising%'",
                    s=killed)[0][0]:
        assert time.monotonic() < deadline and process.poll() is None, "the denoise never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert status(studio, killed) == "running"
    unbroken = submit(studio, job).target_id
    ran = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], cwd=studio.folder,
                         env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert status(studio, killed) == status(studio, unbroken) == "completed"
    attempts = query(studio, "SELECT attempts FROM steps WHERE session_id = :s AND step_type = 'inference_generation'",
                     s=killed)[0][0]
    assert attempts == 2
    completions = [e for e in studio.store.stream("session", killed) if e.type == "session.completed"]
    assert len(completions) == 1
    pictures = [Image.open(studio.config.outbox / sid / result_of(studio, sid)["images"][0]).tobytes()
                for sid in (killed, unbroken)]
    assert pictures[0] == pictures[1]
    assert studio.store.verify() == []


def test_engine_models_says_what_each_model_needs_and_when_its_parts_stay_on_the_cpu(studio, models):
    """`engine models` reads each pipeline's size from its files' headers (the values of each part,
    as torch counts them in the loaded pipeline, a tied weight once) and says what it needs on a GPU, whole and with its
    parts offloaded; the offload plan follows from that and the memory free."""
    from diffusers import FluxPipeline

    from engine.domains import memory
    from tests.helpers import engine_process

    listed = {m["id"]: m for m in json.loads(engine_process(studio, "models", "--json"))}
    pipe = FluxPipeline.from_pretrained(models / "flux-dev")
    loaded = {name: sum(v.numel() for v in {v.data_ptr(): v for v in getattr(pipe, name).state_dict().values()}.values())
              for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    counts = memory.parameter_counts(models / "flux-dev")
    assert counts == loaded
    whole, largest = memory.pipeline_needs(counts, 2, 1024, 1024)
    assert whole == sum(loaded.values()) * 2 + memory.activation_bytes(1024, 1024, 1, 2)
    assert largest == max(loaded.values()) * 2 + memory.activation_bytes(1024, 1024, 1, 2)
    flux = listed["flux-dev"]
    assert (flux["needs_gib"], flux["least_gib"]) == (round(whole / 2**30, 1), round(largest / 2**30, 1))
    assert (flux["family"], listed["flux-schnell"]["variant"]) == ("flux", "schnell")
    assert listed["flux-style"]["needs_gib"] is None  # a LoRA is not a pipeline
    gib = 2**30
    assert memory.offload_plan(20 * gib, 12 * gib, 24 * gib) == "none"
    assert memory.offload_plan(33 * gib, 23 * gib, 24 * gib) == "model"
    assert memory.offload_plan(33 * gib, 23 * gib, 16 * gib) == "sequential"
    assert memory.offload_plan(33 * gib, 23 * gib, 16 * gib, "off") == "none"


def test_on_a_gpu_the_transformer_families_run_in_bfloat16_unless_told_otherwise():
    """FLUX.1 and SD 3.5 overflow in float16: with [device] dtype "auto" they get bfloat16 on a GPU
    that has it; the UNets keep float16; the CPU float32; a dtype set is a dtype set."""
    import torch

    from engine.domains.device import DeviceInfo, dtype_for
    from engine.domains.families import family_of

    gpu = DeviceInfo("cuda:0", "cuda", 0, "a GPU", 80 * 2**30, 80 * 2**30, fp16=True, bf16=True)
    old_gpu = DeviceInfo("cuda:0", "cuda", 0, "a GPU without bfloat16", 16 * 2**30, 16 * 2**30, fp16=True, bf16=False)
    cpu = DeviceInfo("cpu", "cpu", 0, "CPU", 2**34, 2**34, fp16=False, bf16=True)
    found = {name: dtype_for(gpu, "auto", family_of(name).half) for name in ("sd15", "sdxl", "sd3", "flux", "zimage")}
    assert found == {"sd15": torch.float16, "sdxl": torch.float16, "sd3": torch.bfloat16, "flux": torch.bfloat16,
                     "zimage": torch.bfloat16}
    assert dtype_for(old_gpu, "auto", "bf16") == torch.float16
    assert dtype_for(cpu, "auto", "bf16") == torch.float32
    assert dtype_for(gpu, "fp16", "bf16") == torch.float16


def test_a_flux_transformer_saved_alone_runs_with_the_text_encoders_and_vae_of_a_folder(studio, models, tmp_path):
    """A FLUX.1 transformer as its own .safetensors file is registered with --configs-from (refused
    without it, saying why), recognised as FLUX.1 (schnell from its lack of a guidance embedding),
    and runs with the folder's text encoders and VAE: its pictures are those of a folder that
    holds that transformer, not the folder's own."""
    import shutil

    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from engine.domains.tinymodels import build_tiny_flux
    from tests.helpers import engine_process

    other = build_tiny_flux(tmp_path / "other", seed=5)
    transformer = FluxTransformer2DModel.from_pretrained(other / "transformer")
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, tmp_path / "flux-transformer.safetensors")
    reference = tmp_path / "reference"
    shutil.copytree(models / "flux-dev", reference)
    shutil.rmtree(reference / "transformer")
    shutil.copytree(other / "transformer", reference / "transformer")
    schnell = FluxTransformer2DModel.from_pretrained(models / "flux-schnell" / "transformer")
    save_file({k: v.contiguous() for k, v in schnell.state_dict().items()}, tmp_path / "schnell-transformer.safetensors")

    refused_add = subprocess_engine(studio, "models", "add", str(tmp_path / "flux-transformer.safetensors"), "--id", "x")
    assert refused_add.returncode != 0 and "--configs-from" in refused_add.stderr and "transformer" in refused_add.stderr
    engine_process(studio, "models", "add", str(tmp_path / "flux-transformer.safetensors"), "--id", "flux-file",
                   "--configs-from", str(models / "flux-dev"))
    engine_process(studio, "models", "add", str(tmp_path / "schnell-transformer.safetensors"), "--id", "schnell-file",
                   "--configs-from", str(models / "flux-schnell"))
    engine_process(studio, "models", "add", str(reference), "--id", "flux-reference")
    listed = {m["id"]: m for m in json.loads(engine_process(studio, "models", "--json"))}
    assert (listed["flux-file"]["family"], listed["flux-file"]["format"]) == ("flux", "safetensors")
    assert (listed["flux-file"]["variant"], listed["schnell-file"]["variant"]) == (None, "schnell")
    ids = {model: submit(studio, {"workflow": "txt2img", "params": {**SIZE, "model": model, "prompt": "a fox",
                                                                    "seed": 9}}).target_id
           for model in ("flux-file", "flux-reference", "flux-dev")}
    run_until_idle(studio)
    pictures = {model: Image.open(studio.config.outbox / sid / result_of(studio, sid)["images"][0]).tobytes()
                for model, sid in ids.items()}
    assert pictures["flux-file"] == pictures["flux-reference"] != pictures["flux-dev"]


def subprocess_engine(install, *arguments: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "engine", *arguments], env=install.env(), cwd=install.folder,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model,other", [("flux-dev", "sd35"), ("sd35", "flux-dev")])
def test_a_controlnet_of_its_family_guides_a_transformer_and_one_of_another_family_is_refused(studio, models, tmp_path,
                                                                                              model, other):
    """A ControlNet made in code for a tiny FLUX.1 (or SD 3.5) is recognised as that family's, runs
    through the family's ControlNet pipeline and changes the picture; the other family's ControlNet
    and an SDXL one are refused at submit, naming the family."""
    from engine.domains.tinymodels import build_tiny_controlnet, build_tiny_transformer_controlnet

    registry = ModelRegistry(studio.config.models_dir)
    for name, folder in ((model, models / model), (other, models / other)):
        registry.add(build_tiny_transformer_controlnet(tmp_path / f"cn-{name}", folder), f"cn-{name}")
    registry.add(build_tiny_controlnet(tmp_path / "cn-sdxl", models / "sdxl"), "cn-sdxl")
    assert registry.entries()[f"cn-{model}"].family == {"flux-dev": "flux", "sd35": "sd3"}[model]
    base = {**SIZE, "model": model, "prompt": "a lighthouse", "seed": 3}
    guided = submit(studio, {"workflow": "controlnet", "params": {**base, "controlnet": {
        "model": f"cn-{model}", "image": "images/start.png", "conditioning_scale": 1.0}}}).target_id
    plain = submit(studio, {"workflow": "txt2img", "params": base}).target_id
    for wrong in (f"cn-{other}", "cn-sdxl"):
        message = refused(studio, {"workflow": "controlnet", "params": {**base, "controlnet": {
            "model": wrong, "image": "images/start.png"}}})
        assert "controlnet.model" in message and wrong in message, message
    run_until_idle(studio)
    assert status(studio, guided) == status(studio, plain) == "completed", result_of(studio, guided).get("error")
    data = next(s for s in result_of(studio, guided)["steps"] if s["type"] == "inference_generation")["data"]
    assert data["mode"] == "controlnet"
    pictures = [Image.open(studio.config.outbox / sid / result_of(studio, sid)["images"][0]) for sid in (guided, plain)]
    assert pictures[0].size == (64, 64) and pictures[0].tobytes() != pictures[1].tobytes()


def test_flux_on_the_compiled_path_and_in_float8_makes_its_pictures_close_to_bfloat16s(tmp_path, models):
    """FLUX.1 on the CPU: registered compiled (torch.compile's "eager" backend traces the same
    graphs a GPU compiles; the regional scope finds the transformer's two kinds of repeated block)
    it makes bfloat16's picture (to bfloat16's rounding); in float8 the transformer blocks' linear layers are swapped and its
    picture is close to bfloat16's, not equal to it."""
    import numpy as np

    install = Installation(tmp_path / "engine", settings={
        "handlers": {"modules": ["engine.domains"]}, "device": {"preferred": "cpu"},
        "compile": {"backend": "eager", "batch_sizes": [1], "scope": "regional"}})
    registry = ModelRegistry(install.config.models_dir)
    registry.add(models / "flux-dev", "b16", precision="bf16")
    registry.add(models / "flux-dev", "compiled", precision="bf16", compile_setting="on")
    registry.add(models / "flux-dev", "f8", precision="fp8", compile_setting="on")
    job = {"workflow": "txt2img", "params": {**SIZE, "prompt": "a lantern", "seed": 21}}
    ids = {model: submit(install, {**job, "params": {**job["params"], "model": model}}).target_id
           for model in ("b16", "compiled", "f8")}
    run_until_idle(install)
    data, pictures = {}, {}
    for model, session_id in ids.items():
        result = result_of(install, session_id)
        assert result["status"] == "completed", result.get("error")
        data[model] = next(s["data"] for s in result["steps"] if s["type"] == "inference_generation")
        pictures[model] = np.asarray(Image.open(install.config.outbox / session_id / result["images"][0]), dtype=float)
    assert [(data[m]["compiled"], data[m]["precision"]) for m in ids] == [
        (False, "bfloat16"), (True, "bfloat16"), (True, "fp8")]
    compiled = [json.loads(r[0]) for r in query(install, "SELECT data FROM event_log WHERE type = 'model.compiled'")]
    assert {(c["model_id"], c["scope"]) for c in compiled} == {("compiled", "regional"), ("f8", "regional")}

    def psnr(a, b) -> float:
        mse = ((a - b) ** 2).mean()
        return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))

    assert psnr(pictures["compiled"], pictures["b16"]) > 40  # bfloat16 either way, in another memory layout
    assert 20 < psnr(pictures["f8"], pictures["b16"]) < float("inf")
    install.engine.close()


def test_what_a_family_refuses_reaches_the_real_clients_as_a_clear_error_and_nothing_is_recorded(tmp_path, models):
    """Over HTTP, with the real clients: a FLUX.1 size off its grid through OpenAI's images API, an
    SD sampler for FLUX.1 through webuiapi, a negative prompt on FLUX.1 through /v1/jobs: each is a
    4xx with the contract's code and the reason, and no session is recorded."""
    import httpx
    import openai
    import webuiapi

    from tests.served import Served

    install = Installation(tmp_path / "engine")
    install.engine.models.add(models / "flux-dev", "flux-dev")
    server = Served(install, "--no-runner")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.images.generate(model="flux-dev", prompt="a fox", size="1000x1000")
        assert caught.value.status_code in (400, 422)
        body = caught.value.response.json()
        assert "multiples of 16" in json.dumps(body) and "1008" in json.dumps(body)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        with pytest.raises(Exception) as sampler:
            api.txt2img(prompt="a fox", width=64, height=64, steps=2, sampler_name="DPM++ 2M",
                        override_settings={"sd_model_checkpoint": "flux-dev"})
        assert "euler" in str(sampler.value) and "FLUX.1" in str(sampler.value)
        answer = httpx.post(f"{server.url}/v1/jobs", json={"workflow": "txt2img", "params": {
            "model": "flux-dev", "prompt": "x", "negative_prompt": "blurry", "width": 64, "height": 64}})
        assert answer.status_code == 422 and answer.json()["code"] == "VALIDATION_ERROR"
        assert "negative prompt" in answer.json()["message"]
    finally:
        server.stop()
    assert query(install, "SELECT COUNT(*) FROM sessions")[0][0] == 0
    install.engine.close()


def test_flux_and_sd35_job_files_dropped_in_the_inbox_complete_with_their_pictures(studio):
    """The inbox door: a FLUX.1 dev and an SD 3.5 job file, taken by the inbox scan, made, and
    reported in result.json with the model's defaults filled in and the PNG's parameters."""
    jobs = {"flux.json": {"workflow": "txt2img", "params": {"width": 64, "height": 64, "model": "flux-dev",
                                                           "prompt": "an inbox fox", "seed": 1, "steps": 2}},
            "sd35.json": {"workflow": "txt2img", "params": {"width": 64, "height": 64, "model": "sd35",
                                                           "prompt": "an inbox owl", "seed": 2, "steps": 2}}}
    for name, job in jobs.items():
        (studio.config.inbox / name).write_text(json.dumps(job))
    outcomes = {o.file_name: o for o in studio.engine.inbox().scan()}
    assert all(outcomes[name].accepted for name in jobs), outcomes
    run_until_idle(studio)
    for name, model, guidance in (("flux.json", "flux-dev", 3.5), ("sd35.json", "sd35", 4.5)):
        result = result_of(studio, outcomes[name].target_id)
        assert result["status"] == "completed" and result["params"]["guidance_scale"] == guidance
        picture = Image.open(studio.config.outbox / outcomes[name].target_id / result["images"][0])
        assert f"Model: {model}" in picture.text["parameters"] and f"CFG scale: {guidance}" in picture.text["parameters"]
