"""OpenAI's images API: POST /v1/images/generations (and /v1/images/edits, multipart), as the
official `openai` clients call it. The request becomes a job on the one submit path; the answer
waits for the session and carries its images as b64_json or as URLs of /v1/sessions/{id}/images/{n}.
Any of the engine's params may ride in the body (the openai client's `extra_body`); an
Idempotency-Key header (`extra_headers`) makes the client's own retries find the same job."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool

from engine.doors.http.shared import (Stopping, Writes, ended_or_raise, idempotency_key, images_base64,
                                      submit, wait_for)
from engine.errors import UnknownModel, ValidationError
from engine.face.writes import save_upload, upload_path

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")  # answered by the default model
IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression", "output_format",
           "stream", "partial_images")


def to_job(engine, body: dict[str, Any], workflow: str = "txt2img") -> tuple[dict[str, Any], str]:
    """The job an OpenAI images request asks for, and the response_format."""
    params = {k: v for k, v in body.items() if k not in ("n", "size", "model", "response_format", *IGNORED)}
    if "prompt" not in body or not isinstance(body["prompt"], str):
        raise ValidationError("prompt: required, a string", [{"loc": "prompt"}])
    if body.get("n") is not None:
        params["num_images"] = body["n"]
    size = body.get("size")
    if size not in (None, "auto"):
        try:
            width, height = (int(part) for part in str(size).lower().split("x"))
        except ValueError:
            raise ValidationError(f"size: {size!r}; WIDTHxHEIGHT, such as 1024x1024", [{"loc": "size"}]) from None
        params["width"], params["height"] = width, height
    model = body.get("model")
    if model and model not in OPENAI_MODELS:
        if model not in engine.models.entries():
            raise UnknownModel(f"model: {model!r} is not registered here; known: "
                               f"{', '.join(engine.models.entries()) or 'none'} (an OpenAI model name takes the "
                               "default model)", [{"loc": "model"}])
        params["model"] = model
    response_format = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise ValidationError(f"response_format: {response_format!r}; b64_json or url", [{"loc": "response_format"}])
    return {"workflow": workflow, "params": params}, response_format


async def answer(engine, writes: Writes, request: Request, job: dict, response_format: str, key: str | None,
                 stopping: Stopping) -> dict:
    done = await run_in_threadpool(submit, engine, writes, job, key, "openai")
    report = ended_or_raise(await wait_for(engine, done.target_id, engine.config.get("server", "wait_seconds"),
                                           stopping))
    return await run_in_threadpool(_data, request, report, response_format)


def _data(request: Request, report: dict, response_format: str) -> dict:
    prompt = report["params"].get("prompt")
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/v1/sessions/{report['session_id']}/images/{n}", "revised_prompt": prompt}
                for n in range(len(report["images"]))]
    else:
        data = [{"b64_json": image, "revised_prompt": prompt} for image in images_base64(report)]
    return {"created": int(time.time()), "data": data}


def openai_mask(engine, relative: str) -> str:
    """OpenAI's mask marks what to edit by transparency; the engine's inpaint mask by white. A mask
    with an alpha channel is turned into white where it is transparent, black elsewhere."""
    from PIL import Image

    path = upload_path(engine, relative)
    with Image.open(path) as image:
        if "A" not in image.getbands():
            return relative
        white = image.getchannel("A").point(lambda alpha: 255 if alpha < 128 else 0)
    white.save(path, format="PNG")
    return relative


def router(engine, stopping: Stopping, writes: Writes) -> APIRouter:
    api = APIRouter(prefix="/v1/images")

    @api.post("/generations", summary="OpenAI's images.generate: waits for the session, answers its images")
    async def generations(body: dict[str, Any], request: Request,
                          idempotency: str | None = Header(None, alias="Idempotency-Key")):
        job, response_format = await run_in_threadpool(to_job, engine, body)
        return await answer(engine, writes, request, job, response_format, idempotency_key(idempotency), stopping)

    @api.post("/edits", summary="OpenAI's images.edit (multipart image, optional mask): img2img or inpaint")
    async def edits(request: Request, idempotency: str | None = Header(None, alias="Idempotency-Key")):
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        for name in ("n",):
            if name in fields:
                fields[name] = int(fields[name])
        image = form.get("image") or form.get("image[]")
        if image is None or isinstance(image, str):
            raise ValidationError("image: required, a file", [{"loc": "image"}])
        mask = form.get("mask")
        raw_image = await image.read()
        raw_mask = await mask.read() if mask is not None and not isinstance(mask, str) else None

        def prepare() -> tuple[dict, str]:
            job, response_format = to_job(engine, fields, "inpaint" if raw_mask else "img2img")
            job["params"]["init_image"] = save_upload(engine, raw_image, "image")
            if raw_mask:
                job["params"]["mask_image"] = openai_mask(engine, save_upload(engine, raw_mask, "mask"))
            return job, response_format

        job, response_format = await run_in_threadpool(prepare)
        return await answer(engine, writes, request, job, response_format, idempotency_key(idempotency), stopping)

    return api
