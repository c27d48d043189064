"""The inference domain: txt2img, img2img, inpaint and ControlNet on SDXL and SD 1.5-class pipelines,
with LoRAs and schedulers by name.

One seeded generator per image, so a seed gives the same image whatever else ran beside it.
Between denoising steps the handler reports progress and polls the cancellation token.
"""

from __future__ import annotations

from typing import Any

from engine.domains import memory
from engine.domains.device import generator_device
from engine.domains.model import component_for, pipeline_for, registry_of
from engine.errors import OutOfMemory, ValidationError
from engine.handlers import StepContext, StepResult
from engine.outbox import a1111_parameters, save_png
from engine.paths import resolve_inside

# name -> (scheduler class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str | None, default):
    if not name:
        return default
    import diffusers

    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(default.config, **extra)


def load_image(ctx: StepContext, relative: str, field: str, mode: str, size: tuple[int, int]):
    from PIL import Image

    path = resolve_inside(ctx.inbox, relative, field)
    with Image.open(path) as image:
        return image.convert(mode).resize(size, Image.Resampling.LANCZOS)


def load_controlnet(entry, path):
    from diffusers import ControlNetModel

    if path.is_dir():
        return ControlNetModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    return ControlNetModel.from_single_file(str(path), local_files_only=True)


def _pipeline_for_mode(ctx: StepContext, base, mode: str, device, dtype):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    if mode == "txt2img":
        return base
    if mode == "img2img":
        return AutoPipelineForImage2Image.from_pipe(base)
    if mode == "inpaint":
        return AutoPipelineForInpainting.from_pipe(base)
    if mode == "controlnet":
        from engine.domains.device import torch_device

        controlnet = component_for(ctx, ctx.params["controlnet"]["model"], "controlnet",
                                   lambda entry, path: load_controlnet(entry, path).to(torch_device(device), dtype))
        return AutoPipelineForText2Image.from_pipe(base, controlnet=controlnet)
    raise ValidationError(f"unknown generation mode {mode!r}")


def _mode_inputs(ctx: StepContext, mode: str, size: tuple[int, int]) -> dict[str, Any]:
    p = ctx.params
    if mode == "img2img":
        return {"image": load_image(ctx, p["init_image"], "params.init_image", "RGB", size), "strength": p["strength"]}
    if mode == "inpaint":
        return {"image": load_image(ctx, p["init_image"], "params.init_image", "RGB", size),
                "mask_image": load_image(ctx, p["mask_image"], "params.mask_image", "L", size),
                "strength": p["strength"], "width": size[0], "height": size[1]}
    if mode == "controlnet":
        c = p["controlnet"]
        return {"image": load_image(ctx, c["image"], "params.controlnet.image", "RGB", size),
                "controlnet_conditioning_scale": c["conditioning_scale"],
                "control_guidance_start": c["guidance_start"], "control_guidance_end": c["guidance_end"],
                "width": size[0], "height": size[1]}
    return {"width": size[0], "height": size[1]}


def _apply_loras(ctx: StepContext, base) -> list[str]:
    names, scales = [], []
    registry = registry_of(ctx)
    for index, lora in enumerate(ctx.params.get("loras") or []):
        entry = registry.get(lora["model"], "lora", f"params.loras[{index}].model")
        name = f"lora{index}"
        base.load_lora_weights(str(entry.location(ctx.config.models_dir)), adapter_name=name)
        names.append(name)
        scales.append(lora["scale"])
    if names:
        base.set_adapters(names, adapter_weights=scales)
    return names


def generate(ctx: StepContext, pipe, inputs: dict[str, Any], seeds: list[int], device) -> list:
    """Run the pipeline once per call, one generator per image; progress and cancel between steps."""
    import torch

    p = ctx.params
    generators = [torch.Generator(device=generator_device(device)).manual_seed(s) for s in seeds]

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        total = getattr(pipeline, "num_timesteps", None) or p["steps"]
        ctx.progress((step + 1) / max(total, 1), f"denoising {step + 1}/{total}")
        ctx.token.raise_if_set()
        return callback_kwargs

    ctx.token.raise_if_set()
    result = pipe(prompt=p["prompt"], negative_prompt=p["negative_prompt"] or None, num_inference_steps=p["steps"],
                  guidance_scale=p["guidance_scale"], num_images_per_prompt=len(seeds), generator=generators,
                  callback_on_step_end=on_step_end, output_type="pil", **inputs)
    return list(result.images)


def _generate_or_oom(ctx: StepContext, pipe, inputs: dict[str, Any], seeds: list[int], device,
                     one_at_a_time: bool = False) -> tuple[list | None, str]:
    """The images, or (None, the error's text) when the device ran out of memory."""
    try:
        if one_at_a_time:
            return [image for seed in seeds for image in generate(ctx, pipe, inputs, [seed], device)], ""
        return generate(ctx, pipe, inputs, seeds, device), ""
    except Exception as exc:
        if memory.is_oom(exc):
            return None, str(exc)
        raise


def generation_step(ctx: StepContext) -> StepResult:
    """inference_generation: make the session's images into the attempt folder."""
    import torch

    p = ctx.params
    mode = ctx.step_config.get("mode", "txt2img")
    size = (p["width"], p["height"])
    # 1. The pipeline, warm from the cache when possible.
    cached, loaded, device = pipeline_for(ctx, p["model"])
    base = cached.value
    dtype = base.unet.dtype if hasattr(base, "unet") else torch.float32
    # 2. Refuse what cannot fit before trying.
    memory.check_fits(memory.activation_bytes(size[0], size[1], p["num_images"], torch.finfo(dtype).bits // 8),
                      device, already_loaded=True, weights=0)
    # 3. Scheduler by name and LoRAs, undone after the step so the cached pipeline stays clean.
    base.scheduler = make_scheduler(p.get("scheduler"), cached.default_scheduler)
    scheduler_name = type(base.scheduler).__name__
    adapters = _apply_loras(ctx, base)
    try:
        pipe = _pipeline_for_mode(ctx, base, mode, device, dtype)
        pipe.set_progress_bar_config(disable=True)
        inputs = _mode_inputs(ctx, mode, size)
        seeds = [(p["seed"] + i) % 2**32 for i in range(p["num_images"])]
        memory.reset_peak(device)
        # 4. Denoise; on out-of-memory free caches and retry once, one image at a time.
        # Both happen outside an except block: a caught error's traceback holds the failed
        # attempt's tensors until the block ends.
        images, error = _generate_or_oom(ctx, pipe, inputs, seeds, device)
        retried = images is None
        if retried:
            memory.free_caches(device)
            images, error = _generate_or_oom(ctx, pipe, inputs, seeds, device, one_at_a_time=True)
        if images is None:
            memory.free_caches(device)
            raise OutOfMemory(f"out of memory on {device.id} even one image at a time: {error}")
    finally:
        if adapters:
            base.unload_lora_weights()
        base.scheduler = cached.default_scheduler
    # 5. Save PNGs with the parameters embedded (AUTOMATIC1111 format).
    names = []
    for index, (image, seed) in enumerate(zip(images, seeds)):
        name = f"{index:05d}-{seed}.png"
        save_png(image, ctx.work_dir / name, a1111_parameters(p, seed, {"Workflow mode": mode}))
        names.append(name)
    return StepResult(images=names, data={
        "mode": mode, "seeds": seeds, "device": device.id, "dtype": str(dtype).replace("torch.", ""),
        "model": cached.entry.id, "model_loaded_here": loaded, "scheduler": scheduler_name,
        "peak_memory_bytes": memory.peak_bytes(device), "out_of_memory_retry": retried,
    })
