"""The inference domain: txt2img, img2img, inpaint and ControlNet on SDXL and SD 1.5-class pipelines,
with LoRAs and schedulers by name.

One seeded generator per image, so a seed gives the same image whatever else ran beside it.
Between denoising steps the handler reports progress and polls the cancellation token.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from engine.domains import families, memory
from engine.domains.accelerate import bucket_split, run_call
from engine.domains.device import generator_device
from engine.domains.model import component_for, denoiser_of, pipeline_for, registry_of
from engine.domains.readback import round_on_device
from engine.errors import OutOfMemory, ValidationError
from engine.run.handlers import StepContext, StepResult, SubmitCheck
from engine.inputs import digest_key, read_image
from engine.params import StepParams
from engine.outbox.png import a1111_parameters, a1111_sampler, save_png
from engine.paths import resolve_inside

def make_scheduler(name: str | None, default, family=None):
    """The scheduler of this name from the family's table (SD-class ones when none is given)."""
    if not name:
        return default
    import diffusers

    table = family.schedulers if family is not None else families.SD_SCHEDULERS
    class_name, extra = table[name]
    return getattr(diffusers, class_name).from_config(default.config, **extra)


def load_vae(entry, path):
    from diffusers import AutoencoderKL

    if path.is_dir():
        return AutoencoderKL.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    return AutoencoderKL.from_single_file(str(path), local_files_only=True)


def job_vae(ctx: StepContext, device, dtype):
    """The registered VAE a job names instead of its model's own (None: the model's)."""
    if not ctx.params.vae:
        return None
    from engine.domains.device import torch_device

    return component_for(ctx, ctx.params.vae, "vae", lambda entry, path: load_vae(entry, path).to(
        torch_device(device), dtype))


def load_image(ctx: StepContext, relative: str, field: str, mode: str, size: tuple[int, int]):
    """An input image of the job, checked again as at submit (the very file, the pixel limit)."""
    from PIL import Image

    path = resolve_inside(ctx.inbox, relative, field)
    given = read_image(path, field, ctx.config.get("limits", "max_image_pixels"),
                       ctx.params.input_digests.get(digest_key(field)))
    return given.image.convert(mode).resize(size, Image.Resampling.LANCZOS)


def load_controlnet(entry, path, family):
    """A ControlNet of the pipeline's family (its class: the UNets' ControlNetModel, FLUX.1's, SD 3's)."""
    import diffusers

    cls = getattr(diffusers, family.controlnet_class)
    if path.is_dir():
        return cls.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    return cls.from_single_file(str(path), local_files_only=True)


def hires_size(params: StepParams, grid: int = 8) -> tuple[int, int]:
    """The hires fix's second-pass size: the first times hires_scale, down to the family's grid
    (multiples of 8 for the UNets, 16 for the transformers)."""
    scale = float(params.hires_scale or 2.0)
    return (max(grid, int(params.width * scale) // grid * grid),
            max(grid, int(params.height * scale) // grid * grid))


def grid_of(models, model_id: str | None) -> int:
    """The size grid of a pipeline's family (the default pipeline's for None)."""
    entry = models.get(model_id, "pipeline") if model_id else models.default_pipeline()
    return families.family_of(entry.family).size_multiple


MAX_SCHEDULE = 1000  # the training timesteps of SD-class schedulers: no schedule is longer


def denoising_steps(steps: int, strength: float) -> int:
    """The denoising steps diffusers runs for an image-to-image call of `steps` at `strength`."""
    return min(int(steps * strength), steps)


def hires_schedule(hires_steps: int, strength: float) -> int:
    """The schedule length at which an image-to-image call at `strength` runs exactly `hires_steps`
    denoising steps, as AUTOMATIC1111 runs its hires pass (it raises the schedule to steps / strength)."""
    total = max(hires_steps, int(hires_steps / strength))
    while denoising_steps(total, strength) < hires_steps:
        total += 1
    return total


def _hires_inits(ctx: StepContext, size: tuple[int, int]) -> list:
    """The upscaled first-pass images the hires fix denoises again, one per image."""
    from PIL import Image as PILImage

    inits = []
    for path in ctx.previous_images():
        with PILImage.open(path) as image:
            inits.append(image.convert("RGB").resize(size, PILImage.Resampling.LANCZOS))
    if len(inits) != ctx.params.num_images:
        raise ValidationError(f"the hires fix found {len(inits)} first-pass image(s), expected {ctx.params.num_images}")
    return inits


def _pipeline_for_mode(ctx: StepContext, base, mode: str, device, dtype, family):
    """The family's pipeline for this mode, sharing the loaded pipeline's components."""
    if mode == "txt2img":
        return base
    import diffusers

    name = family.pipelines.get("img2img" if mode == "hires" else mode)
    if name is None:
        raise ValidationError(f"{family.label} has no {mode} pipeline here; its modes: {', '.join(family.modes)}")
    if mode == "controlnet":
        from engine.domains.device import torch_device

        controlnet = component_for(ctx, ctx.params.controlnet.model, "controlnet",
                                   lambda entry, path: load_controlnet(entry, path, family).to(torch_device(device), dtype))
        return getattr(diffusers, name).from_pipe(base, controlnet=controlnet)
    return getattr(diffusers, name).from_pipe(base)


def _mode_inputs(ctx: StepContext, mode: str, size: tuple[int, int], family=None) -> dict[str, Any]:
    p = ctx.params
    # The transformer families' image-to-image pipelines make their native size unless told the size.
    sized = {"width": size[0], "height": size[1]} if family is not None and family.denoiser == "transformer" else {}
    if mode == "hires":
        return {"strength": p.hires_strength, **sized}
    if mode == "img2img":
        return {"image": load_image(ctx, p.init_image, "params.init_image", "RGB", size), "strength": p.strength,
                **sized}
    if mode == "inpaint":
        return {"image": load_image(ctx, p.init_image, "params.init_image", "RGB", size),
                "mask_image": load_image(ctx, p.mask_image, "params.mask_image", "L", size),
                "strength": p.strength, "width": size[0], "height": size[1]}
    if mode == "controlnet":
        c = p.controlnet
        # The transformers' ControlNet pipelines take it as control_image (their image is img2img's).
        key = "control_image" if family is not None and family.denoiser == "transformer" else "image"
        return {key: load_image(ctx, c.image, "params.controlnet.image", "RGB", size),
                "controlnet_conditioning_scale": c.conditioning_scale,
                "control_guidance_start": c.guidance_start, "control_guidance_end": c.guidance_end,
                "width": size[0], "height": size[1]}
    return {"width": size[0], "height": size[1]}


def _apply_loras(ctx: StepContext, base) -> list[str]:
    names, scales = [], []
    registry = registry_of(ctx)
    for index, lora in enumerate(ctx.params.loras):
        entry = registry.get(lora.model, "lora", f"params.loras[{index}].model")
        name = f"lora{index}"
        base.load_lora_weights(str(entry.location(ctx.config.models_dir)), adapter_name=name)
        names.append(name)
        scales.append(lora.scale)
    if names:
        base.set_adapters(names, adapter_weights=scales)
    return names


def hires_fields(params: StepParams) -> dict[str, Any]:
    """The hires fix's parameters in AUTOMATIC1111's keys."""
    return {"Denoising strength": params.hires_strength, "Hires upscale": params.hires_scale,
            "Hires steps": params.hires_steps or params.steps, "Hires upscaler": params.hires_upscaler or "Lanczos"}


def lora_hashes(ctx: StepContext) -> str | None:
    """`name: short hash, ...` of the session's LoRAs, as AUTOMATIC1111's `Lora hashes`."""
    registry = registry_of(ctx)
    parts = []
    for lora in ctx.params.loras:
        entry = registry.get(lora.model, "lora")
        parts.append(f"{entry.id}: {(entry.sha256 or '')[:12] or 'unknown'}")
    return ", ".join(parts) or None


# submit-time checks (the handler registry's `check` and `output_size`) -------------------------

def submit_check(step: dict[str, Any], params: StepParams, submit: SubmitCheck) -> None:
    """An image-to-image pass denoises int(steps x strength) steps: never zero (diffusers would
    fail at run time); the hires pass runs exactly hires_steps, on a schedule a scheduler has, with
    an upscaler that exists, to a size within limits.max_size."""
    mode, where = step["config"].get("mode"), submit.where
    if mode in ("img2img", "inpaint") and denoising_steps(params.steps, params.strength) < 1:
        least = math.ceil(1000 / params.steps) / 1000
        more = f" or at least {math.ceil(1 / params.strength)} steps" if params.strength > 0 else ""
        raise ValidationError(
            f"{where}.strength: {params.steps} steps at strength {params.strength} denoise "
            f"int({params.steps} x {params.strength}) = 0 steps; give strength at least {least:g}{more}",
            [{"loc": f"{where}.strength"}])
    if mode != "hires":
        return
    if params.hires_upscaler:
        submit.models.get(params.hires_upscaler, "upscaler", f"{where}.hires_upscaler")
    width, height = hires_size(params, grid_of(submit.models, params.model))
    if max(width, height) > submit.limits["max_size"]:
        raise ValidationError(
            f"{where}.hires_scale: the second pass would be {width}x{height}, over limits.max_size "
            f"({submit.limits['max_size']}); lower hires_scale, width or height", [{"loc": f"{where}.hires_scale"}])
    steps = params.hires_steps or params.steps
    if hires_schedule(steps, params.hires_strength) > MAX_SCHEDULE:
        raise ValidationError(
            f"{where}.hires_strength: {steps} hires steps at strength {params.hires_strength} need a schedule of "
            f"{hires_schedule(steps, params.hires_strength)} steps, more than the {MAX_SCHEDULE} a scheduler has; "
            "raise hires_strength or lower hires_steps", [{"loc": f"{where}.hires_strength"}])


def output_size(step: dict[str, Any], params: StepParams, size: tuple[int, int], submit: SubmitCheck) -> tuple:
    """The hires pass makes its second-pass size; every other mode keeps the size it is given."""
    return hires_size(params, grid_of(submit.models, params.model)) if step["config"].get("mode") == "hires" else size


def compatibility(step_config: dict[str, Any], params: StepParams) -> dict[str, Any]:
    """What must be equal for sessions' inference steps to share one pipeline call. Prompts, seeds
    and the number of images may differ (one generator per image keeps each image its own);
    whether a negative prompt is given may not (no negative prompt is encoded differently from
    an empty one)."""
    if step_config.get("mode") == "hires":  # each session denoises its own first pass: never shared
        return {"hires": uuid.uuid4().hex}
    return {
        "model": params.model, "device": params.device, "width": params.width, "height": params.height,
        "steps": params.steps, "scheduler": params.scheduler, "guidance_scale": params.guidance_scale,
        "loras": [lora.model_dump() for lora in params.loras],
        "controlnet": params.controlnet.model_dump() if params.controlnet else None,
        "init_image": params.init_image, "mask_image": params.mask_image, "vae": params.vae,
        "strength": params.strength if params.init_image else None, "negative": bool(params.negative_prompt),
    }


@dataclass
class Image:
    """One image to make: whose it is, its prompt and seed; filled in once made."""

    owner: int
    prompt: str
    negative: str | None
    seed: int
    picture: Any = None
    call_id: str = ""
    call_images: int = 0
    init: Any = None  # its own image to start from (the hires fix's second pass)
    denoised: int = 0  # the denoising steps its call ran (fewer than steps at an img2img strength below 1)


def generate(pipe, wanted: list[Image], p: StepParams, inputs: dict[str, Any], device, contexts) -> None:
    """One pipeline call for these images, one generator per image; progress and cancel between steps."""
    import torch

    generators = [torch.Generator(device=generator_device(device)).manual_seed(w.seed) for w in wanted]

    started = time.perf_counter()

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        total = getattr(pipeline, "num_timesteps", None) or p.steps
        done, elapsed = step + 1, time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
        contexts[0].progress(done / max(total, 1), f"denoising {done}/{total}, {rate:.2f} it/s{eta}")
        if all(c.token.is_set for c in contexts):
            contexts[0].token.raise_if_set()
        return callback_kwargs

    if all(c.token.is_set for c in contexts):
        contexts[0].token.raise_if_set()
    negatives = [w.negative for w in wanted]
    if wanted[0].init is not None:
        inputs = {**inputs, "image": [w.init for w in wanted]}
    result = pipe(prompt=[w.prompt for w in wanted], negative_prompt=None if negatives[0] is None else negatives,
                  num_inference_steps=p.steps, guidance_scale=p.guidance_scale, num_images_per_prompt=1,
                  generator=generators, callback_on_step_end=on_step_end, output_type="pil", **inputs)
    call_id = uuid.uuid4().hex[:12]
    denoised = getattr(pipe, "num_timesteps", 0) or 0
    for image, picture in zip(wanted, result.images):
        image.picture, image.call_id, image.call_images, image.denoised = picture, call_id, len(wanted), denoised


def _generate_or_oom(pipe, wanted: list[Image], p, inputs, device, contexts) -> str:
    """'' when the images were made, else the out-of-memory error's text."""
    try:
        generate(pipe, wanted, p, inputs, device, contexts)
        return ""
    except Exception as exc:
        if memory.is_oom(exc):
            return str(exc)
        raise


def generate_halving(pipe, wanted: list[Image], p, inputs, device, contexts) -> bool:
    """Make the images in one call; on out of memory free caches and make them again in two halves,
    and so on down to one image a call. Returns whether the size had to be lowered. Each retry
    happens outside the except block: a caught error's traceback holds the failed call's tensors."""
    error = _generate_or_oom(pipe, wanted, p, inputs, device, contexts)
    if not error:
        return False
    memory.free_caches(device)
    if len(wanted) == 1:
        raise OutOfMemory(f"out of memory on {device.id} even one image at a time: {error}")
    half = (len(wanted) + 1) // 2
    generate_halving(pipe, wanted[:half], p, inputs, device, contexts)
    generate_halving(pipe, wanted[half:], p, inputs, device, contexts)
    return True


def generate_in_calls(pipe, wanted: list[Image], p, inputs, device, contexts, accelerated,
                      mode: str) -> tuple[bool, bool]:
    """The images in one call, or on the compiled path in calls of its compiled sizes (each made
    eagerly when its compiled run fails or its compile is under way). Returns whether a call's
    size had to be lowered, and whether every call ran compiled."""
    if accelerated is None:
        return generate_halving(pipe, wanted, p, inputs, device, contexts), False
    halved, compiled, start = [], [], 0
    for size in bucket_split(len(wanted), accelerated.sizes):
        chunk, start = wanted[start:start + size], start + size
        compiled.append(run_call(accelerated, pipe, (mode, size, p.width, p.height),
                                 lambda: halved.append(generate_halving(pipe, chunk, p, inputs, device, contexts)),
                                 contexts[0].notify, p.model, device.id))
    return any(halved), bool(compiled) and all(compiled)


def generation_step(contexts: list[StepContext]) -> list[StepResult]:
    """inference_generation for one session or several compatible ones: their images in one
    pipeline call (fewer on out of memory), each session's saved into its own attempt folder."""
    import torch

    ctx = contexts[0]
    p = ctx.params  # what compatibility() makes equal is read from the first; prompts and seeds from each
    mode = ctx.step_config.get("mode", "txt2img")
    size = (p.width, p.height)
    wanted = [Image(owner, c.params.prompt, c.params.negative_prompt or None, (c.params.seed + i) % 2**32)
              for owner, c in enumerate(contexts) for i in range(c.params.num_images)]
    if mode == "hires":  # the second pass: larger, its own steps, each image from its first pass
        size = hires_size(p, grid_of(registry_of(ctx), p.model))
        p = p.model_copy(update={"width": size[0], "height": size[1],
                                 "steps": hires_schedule(p.hires_steps or p.steps, p.hires_strength)})
        for image, init in zip(wanted, _hires_inits(ctx, size)):
            image.init = init
    # 1. The pipeline, warm from the cache when possible.
    cached, loaded, device = pipeline_for(ctx, p.model)
    base = cached.value
    family = families.family_of(cached.entry.family)
    dtype = denoiser_of(base).dtype
    # 2. Refuse what cannot fit before trying: the largest session's images in one call (a group
    #    larger than what fits is halved on out of memory; one session asks no less than before).
    largest = max(c.params.num_images for c in contexts)
    memory.check_fits(memory.activation_bytes(size[0], size[1], largest, torch.finfo(dtype).bits // 8),
                      device, already_loaded=True, weights=0)
    # 3. Scheduler by name and LoRAs, undone after the step so the cached pipeline stays clean.
    base.scheduler = make_scheduler(p.scheduler, cached.default_scheduler, family)
    scheduler_name = type(base.scheduler).__name__
    adapters = _apply_loras(ctx, base)
    own_vae, vae = base.vae, job_vae(ctx, device, dtype)
    if vae is not None:
        base.vae = vae
    try:
        pipe = _pipeline_for_mode(ctx, base, mode, device, dtype, family)
        pipe.set_progress_bar_config(disable=True)
        if device.kind != "directml":  # the same pixels, rounded before they leave the device
            round_on_device(getattr(pipe, "image_processor", None))
        inputs = _mode_inputs(ctx, mode, size, family)
        memory.reset_peak(device)
        budget = memory.call_budget(device)
        # 4. Denoise every image in one call (on the compiled path, in calls of its compiled sizes),
        #    halving a call on out of memory. Calls with LoRAs or a job's own VAE run eagerly.
        started = time.perf_counter()
        halved, compiled = generate_in_calls(pipe, wanted, p, inputs, device, contexts,
                                             None if adapters or vae is not None else cached.accelerated, mode)
        seconds = time.perf_counter() - started
    finally:
        if adapters:
            base.unload_lora_weights()
        base.scheduler = cached.default_scheduler
        base.vae = own_vae
    _report_memory(ctx, budget, memory.peak_bytes(device), max(w.call_images for w in wanted), mode, device)
    # 5. Save each session's PNGs with its parameters embedded (AUTOMATIC1111 format) on the PNG
    #    threads, several at once (compression releases the GIL): the handler returns at once, and
    #    the runner starts the device's next call while they are written.
    peak = memory.peak_bytes(device)
    results = []
    for owner, context in enumerate(contexts):
        mine = [w for w in wanted if w.owner == owner]
        names = [f"{index:05d}-{image.seed}.png" for index, image in enumerate(mine)]
        extra = {"Sampler": a1111_sampler(context.params.scheduler, scheduler_name),
                 "Model hash": cached.file_hash[:10] if cached.file_hash else None,
                 "Lora hashes": lora_hashes(context), "VAE": context.params.vae, "Workflow mode": mode,
                 **(hires_fields(context.params) if mode == "hires" else {})}
        level = context.config.get("outbox", "png_compress_level")
        writing = _save_later([(image.picture, context.work_dir / name,
                                a1111_parameters(context.params.model_dump(), image.seed, extra), level)
                               for image, name in zip(mine, names)])
        record = _record(mine, mode, device, dtype, cached, loaded, scheduler_name, peak, halved, len(contexts),
                         len(wanted), seconds, compiled)
        results.append(StepResult(images=names, writing=writing, data=record.data()))
    return results


def _report_memory(ctx: StepContext, budget, peak: int | None, call_images: int, mode: str, device) -> None:
    """model.measured: what one image took (the call's peak above what was allocated before it),
    and what the call had; later calls of a batch with dynamic_sizing are sized from it."""
    if budget is None or not peak or peak <= budget[0]:
        return
    ctx.notify("model.measured", {
        "model_id": ctx.params.model, "width": ctx.params.width, "height": ctx.params.height, "mode": mode,
        "device": device.id, "per_image_bytes": (peak - budget[0]) // call_images, "available_bytes": budget[1],
        "call_images": call_images})


_png_threads: ThreadPoolExecutor | None = None
_png_threads_lock = threading.Lock()


def _save_later(saves: list[tuple]) -> list[Future]:
    """Each save handed to the PNG threads (started once, kept); one after another, here, when
    no thread can be started (memory ran short)."""
    global _png_threads
    try:
        with _png_threads_lock:
            if _png_threads is None:
                _png_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="engine-png")
        return [_png_threads.submit(save_png, *save) for save in saves]
    except RuntimeError as exc:
        if "thread" not in str(exc):
            raise
    for save in saves:
        save_png(*save)
    return []


@dataclass(frozen=True)
class GenerationRecord:
    """What result.json records of an inference step (its `data`): the images' seeds and the call
    they came from."""

    mode: str
    seeds: list[int]
    device: str
    dtype: str
    model: str
    model_loaded_here: bool
    scheduler: str
    peak_memory_bytes: int | None
    out_of_memory_retry: bool
    call_id: str
    call_images: int
    call_sessions: int
    denoising_steps: int
    group_images: int
    group_seconds: float
    compiled: bool = False  # every call of the group ran on the compiled path
    precision: str = ""  # the pipeline's: float16, bfloat16, float32, or fp8

    def data(self) -> dict[str, Any]:
        return asdict(self)


def _record(mine: list[Image], mode, device, dtype, cached, loaded, scheduler_name, peak, halved, sessions,
            images, seconds, compiled=False) -> GenerationRecord:
    return GenerationRecord(
        mode=mode, seeds=[w.seed for w in mine], device=device.id, dtype=str(dtype).replace("torch.", ""),
        model=cached.entry.id, model_loaded_here=loaded, scheduler=scheduler_name, peak_memory_bytes=peak,
        out_of_memory_retry=halved, call_id=mine[0].call_id, call_images=mine[0].call_images, call_sessions=sessions,
        denoising_steps=mine[0].denoised, group_images=images, group_seconds=round(seconds, 4), compiled=compiled,
        precision=cached.precision or str(dtype).replace("torch.", ""))
