"""AUTOMATIC1111's API under /sdapi/v1, enough for `webuiapi` and scripts written for it: txt2img
and img2img (A1111's field names; base64 images in and out, `parameters` and `info` as A1111
answers), the model and sampler lists, options, progress and interrupt. A request is a job on
the one submit path; the answer waits for its session."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Header
from starlette.concurrency import run_in_threadpool

from engine.doors.http.shared import (Stopping, Writes, control, ended_or_raise, idempotency_key, images_base64,
                                      submit, wait_for)
from engine.errors import EngineError, InvalidTransition, NotFound, ValidationError
from engine.face import reads, words
from engine.face.writes import save_upload

# What A1111's txt2img and img2img fields become here; fields not named are taken as A1111's
# defaults and left alone (styles, subseeds, eta...), except those that would change the picture
# in ways not done here (refused: UNSUPPORTED).
TAKEN = ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "distilled_cfg_scale", "width", "height", "batch_size", "n_iter",
         "sampler_name", "sampler_index", "denoising_strength", "hr_scale", "hr_second_pass_steps")
REFUSED_WHEN_SET = {"restore_faces": "restore_faces", "tiling": "tiling", "script_name": "scripts",
                    "alwayson_scripts": "always-on scripts", "controlnet_units": "the ControlNet extension's units",
                    "hr_prompt": "a second-pass prompt", "hr_negative_prompt": "a second-pass negative prompt",
                    "subseed_strength": "variation seeds"}


def _sampler(body: dict[str, Any]) -> str | None:
    name = body.get("sampler_name") or body.get("sampler_index")
    if not name:
        return None
    wanted = str(name).strip().lower()
    scheduler = str(body.get("scheduler") or "").strip().lower()
    if scheduler == "karras" and f"{wanted} karras" in words.SAMPLER_NAMES:
        wanted = f"{wanted} karras"
    if wanted not in words.SAMPLER_NAMES:
        raise ValidationError(f"sampler_name: {name!r} is not one of {', '.join(sorted(set(words.A1111_SAMPLERS.values())))}",
                              [{"loc": "sampler_name"}])
    return words.SAMPLER_NAMES[wanted]


def to_job(engine, body: dict[str, Any], img2img: bool, chosen_model: str | None = None) -> dict[str, Any]:
    """The job an A1111 request asks for (`chosen_model`: set through POST /options)."""
    for field, what in REFUSED_WHEN_SET.items():
        if body.get(field) not in (None, False, "", [], {}, 0, 0.0):
            raise ValidationError(f"{field}: {what} are not supported here", [{"loc": field}])
    params: dict[str, Any] = {"prompt": body.get("prompt") or "", "negative_prompt": body.get("negative_prompt") or ""}
    for field, to in (("steps", "steps"), ("cfg_scale", "guidance_scale"), ("width", "width"), ("height", "height")):
        if body.get(field) is not None:
            params[to] = body[field]
    seed = body.get("seed")
    if seed is not None and seed != -1:
        params["seed"] = seed
    params["num_images"] = int(body.get("batch_size") or 1) * int(body.get("n_iter") or 1)
    scheduler = _sampler(body)
    if scheduler:
        params["scheduler"] = scheduler
    overrides = body.get("override_settings") or {}
    model = overrides.get("sd_model_checkpoint") or chosen_model
    if model:
        params["model"] = _model_id(engine, model)
    _as_forge(reads.family_of_model(engine, params.get("model")), body, params)
    workflow = "txt2img"
    if img2img:
        images = body.get("init_images") or []
        if not images:
            raise ValidationError("init_images: img2img needs one base64 image", [{"loc": "init_images"}])
        params["init_image"] = save_upload(engine, images[0], "init_images[0]")
        if body.get("denoising_strength") is not None:
            params["strength"] = body["denoising_strength"]
        if body.get("mask"):
            params["mask_image"] = save_upload(engine, body["mask"], "mask")
            workflow = "inpaint"
        else:
            workflow = "img2img"
    elif body.get("enable_hr"):
        workflow = "txt2img-hires"
        params["hires_scale"] = body.get("hr_scale") or 2.0
        if body.get("hr_second_pass_steps"):
            params["hires_steps"] = body["hr_second_pass_steps"]
        if body.get("denoising_strength") is not None:
            params["hires_strength"] = body["denoising_strength"]
    return {"workflow": workflow, "params": params}


def _as_forge(family: dict[str, Any], body: dict[str, Any], params: dict[str, Any]) -> None:
    """Forge's semantics for the flow-matching families: FLUX's guidance is `distilled_cfg_scale`
    (cfg_scale, real classifier-free guidance, is left at Forge's 1 and not taken); a model that
    takes no guidance (schnell) gets none; the Euler samplers are the family's one Euler."""
    if family["guidance"] == "distilled":
        params.pop("guidance_scale", None)
        if body.get("distilled_cfg_scale") is not None and not family["guidance_fixed"]:
            params["guidance_scale"] = body["distilled_cfg_scale"]
    elif family["guidance_fixed"]:
        params.pop("guidance_scale", None)
    scheduler = params.get("scheduler")
    if scheduler and scheduler not in family["schedulers"]:
        if scheduler in ("euler", "euler_a") and "euler" in family["schedulers"]:
            params["scheduler"] = "euler"
        else:
            raise ValidationError(f"sampler_name: {family['model']!r} is {family['label']}, which samples with "
                                  f"{', '.join(family['schedulers'])} only", [{"loc": "sampler_name"}])


def _model_id(engine, title: str) -> str:
    """A model as A1111 names it ("id [hash]" titles, or the id)."""
    entries = engine.models.entries()
    wanted = str(title).split(" [")[0]
    if wanted not in entries:
        raise ValidationError(f"sd_model_checkpoint: {title!r} is not registered; known: {', '.join(entries) or 'none'}",
                              [{"loc": "override_settings.sd_model_checkpoint"}])
    return wanted


def _title(entry) -> str:
    return f"{entry.id} [{(entry.sha256 or '')[:10]}]" if entry.sha256 else entry.id


def result(engine, body: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """A1111's answer: base64 PNGs, the request's parameters, and `info` as a JSON string."""
    seeds = [image["seed"] for image in report["image_details"]]
    params = report["params"]
    info = {"prompt": params.get("prompt"), "negative_prompt": params.get("negative_prompt"),
            "seed": seeds[0] if seeds else params.get("seed"), "all_seeds": seeds or [params.get("seed")],
            "steps": params.get("steps"), "cfg_scale": params.get("guidance_scale"), "width": params.get("width"),
            "height": params.get("height"), "sampler_name": words.A1111_SAMPLERS.get(params.get("scheduler") or ""),
            "sd_model_name": params.get("model"), "batch_size": len(report["images"]),
            "infotexts": [image["parameters"] for image in report["image_details"]],
            "session_id": report["session_id"], "job_id": report["job_id"]}
    return {"images": images_base64(report), "parameters": body, "info": json.dumps(info)}


def router(engine, stopping: Stopping, writes: Writes) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")
    submitted: list[str] = []  # the sessions this door made, newest last (for progress and interrupt)
    options: dict[str, Any] = {}  # what POST /options chose

    async def generate(body: dict[str, Any], key: str | None, img2img: bool) -> dict[str, Any]:
        def submitted_job():
            job = to_job(engine, body, img2img, options.get("sd_model_checkpoint"))
            return submit(engine, writes, job, idempotency_key(key), "a1111")

        done = await run_in_threadpool(submitted_job)
        submitted.append(done.target_id)
        del submitted[:-100]
        report = await wait_for(engine, done.target_id, engine.config.get("server", "wait_seconds"), stopping)
        return await run_in_threadpool(result, engine, body, ended_or_raise(report))

    @api.post("/txt2img", summary="AUTOMATIC1111's txt2img")
    async def txt2img(body: dict[str, Any], idempotency: str | None = Header(None, alias="Idempotency-Key")):
        return await generate(body, idempotency, img2img=False)

    @api.post("/img2img", summary="AUTOMATIC1111's img2img (init_images, and mask for inpainting)")
    async def img2img(body: dict[str, Any], idempotency: str | None = Header(None, alias="Idempotency-Key")):
        return await generate(body, idempotency, img2img=True)

    @api.get("/sd-models", summary="The registered pipelines, as A1111 lists checkpoints")
    def sd_models():
        return [{"title": _title(e), "model_name": e.id, "hash": (e.sha256 or "")[:10] or None, "sha256": e.sha256,
                 "filename": str(e.location(engine.config.models_dir)), "config": None}
                for e in engine.models.entries().values() if e.kind == "pipeline"]

    @api.get("/samplers", summary="The samplers, by A1111's names")
    def samplers():
        named = {}
        for a1111_name, scheduler in words.SAMPLER_NAMES.items():
            label = words.A1111_SAMPLERS.get(scheduler, a1111_name)
            named.setdefault(label, {"name": label, "aliases": [scheduler], "options": {}})
        return list(named.values())

    @api.get("/schedulers", summary="The noise schedules (A1111 1.9+)")
    def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]

    @api.get("/options", summary="The options A1111 clients read (the checkpoint in use)")
    def get_options():
        try:
            default = engine.models.default_pipeline()
        except EngineError:  # none registered
            default = None
        chosen = options.get("sd_model_checkpoint")
        return {"sd_model_checkpoint": chosen or (_title(default) if default else None),
                "sd_checkpoint_hash": (default.sha256 if default and not chosen else None)}

    @api.post("/options", summary="Choose the checkpoint later A1111 requests use")
    def set_options(body: dict[str, Any]):
        if "sd_model_checkpoint" in body:
            options["sd_model_checkpoint"] = _model_id(engine, body["sd_model_checkpoint"])
        return None

    @api.get("/progress", summary="The progress of this door's newest running session")
    def progress():
        for session_id in reversed(submitted):
            try:
                report = reads.session(engine, session_id)
            except NotFound:
                continue
            if report["status"] in ("pending", "running", "paused"):
                return {"progress": report["progress"], "eta_relative": report["estimated_completion_seconds"] or 0.0,
                        "state": {"skipped": False, "interrupted": False, "job": report["session_id"],
                                  "job_count": 1, "job_timestamp": report["created_at"], "job_no": 0,
                                  "sampling_step": 0, "sampling_steps": report["params"].get("steps")},
                        "current_image": None, "textinfo": report["activity"]}
        return {"progress": 0.0, "eta_relative": 0.0, "state": {"skipped": False, "interrupted": False, "job": "",
                                                                 "job_count": 0, "job_no": 0, "sampling_step": 0,
                                                                 "sampling_steps": 0},
                "current_image": None, "textinfo": None}

    @api.post("/interrupt", summary="Cancel this door's running sessions")
    def interrupt():
        for session_id in list(submitted):
            try:
                control(engine, writes, session_id, "cancel")
            except (NotFound, InvalidTransition):
                continue
        return None

    @api.post("/skip", summary="As interrupt")
    def skip():
        return interrupt()

    @api.get("/scripts", summary="No scripts here")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @api.get("/upscalers", summary="The registered upscalers")
    def upscalers():
        return [{"name": e.id, "model_name": e.id, "model_path": str(e.location(engine.config.models_dir)),
                 "model_url": None, "scale": 4} for e in engine.models.entries().values() if e.kind == "upscaler"]

    return api
