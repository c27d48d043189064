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
    install = Installation(tmp_path / "engine", settings={"handlers": {"modules": ["engine.domains"]}})
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
                                                          "mask_image": "images/mask.png"}}}
    ids = {mode: submit(studio, job).target_id for mode, job in jobs.items()}
    run_until_idle(studio)
    for mode, session_id in ids.items():
        assert status(studio, session_id) == "completed", (mode, result_of(studio, session_id).get("error"))
        result = result_of(studio, session_id)
        generation = next(s for s in result["steps"] if s["type"] == "inference_generation")["data"]
        assert (generation["model"], generation["mode"]) == (model, mode)
        picture = Image.open(studio.config.outbox / session_id / result["images"][0])
        assert picture.size == (64, 64)
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
