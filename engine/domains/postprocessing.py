"""The postprocessing domain: upscale (a spandrel model, or Lanczos), enhance, and a safety check.

A postprocessing step takes the images of the newest earlier step that made any (or
params.init_image in the upscale workflow) and applies its ops in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageEnhance, ImageOps

from engine.domains.device import device_of, torch_device
from engine.domains.model import component_for
from engine.errors import ValidationError
from engine.params import StepParams
from engine.run.handlers import StepContext, StepResult, SubmitCheck
from engine.inputs import read_image
from engine.outbox.png import save_png
from engine.paths import resolve_inside

PRESETS: dict[str, dict[str, Any]] = {
    "crisp": {"sharpness": 1.4, "contrast": 1.05},
    "vivid": {"color": 1.25, "contrast": 1.1},
    "soft": {"sharpness": 0.7, "contrast": 0.97},
    "auto": {"auto_levels": True},
}

SAFETY_SKIPPED = "skipped: no safety model is configured (set safety.model in config.toml); images were NOT checked"


def ops_for(ctx: StepContext) -> list[dict[str, Any]]:
    return step_ops(ctx.step_config, ctx.params)


def step_ops(step_config: dict[str, Any], params: StepParams) -> list[dict[str, Any]]:
    """A step's ops: the params' ops, the template's defaults, or defaults overridden by name."""
    if step_config.get("ops_from") == "hires":  # the hires fix's upscale, from its params
        return [{"op": "upscale", "model": params.hires_upscaler, "scale": params.hires_scale or 2.0}]
    given = [op.model_dump() for op in params.postprocess]
    defaults = step_config.get("default_ops") or []
    if step_config.get("ops_from") == "by_name":
        by_name = {op["op"]: op for op in given}
        return [by_name.get(op["op"], op) for op in defaults]
    return given or defaults


def upscaled_size(size: tuple[int, int], scale: float | None) -> tuple[int, int]:
    factor = float(scale or 2.0)
    return round(size[0] * factor), round(size[1] * factor)


def check_output_pixels(size: tuple[int, int], limit: int, field: str) -> None:
    """Refuse an image larger than limits.max_output_pixels before it is made."""
    if size[0] * size[1] > limit:
        raise ValidationError(f"{field}: the image would be {size[0]}x{size[1]} ({size[0] * size[1]} pixels), over "
                              f"limits.max_output_pixels ({limit}); lower the scale or the size", [{"loc": field}])


# submit-time checks (the handler registry's `check` and `output_size`) -------------------------

def _scale_field(step: dict[str, Any], params: StepParams, op: dict[str, Any], where: str) -> str:
    """Where in the job an upscale's scale was given: the hires fix's params, params.postprocess[i],
    or (the template's default op applied to the input) the input image."""
    given = [given.model_dump() for given in params.postprocess]
    if step["config"].get("ops_from") == "hires":
        return f"{where}.hires_scale"
    if op in given:
        return f"{where}.postprocess[{given.index(op)}].scale"
    return f"{where}.init_image"


def check_presets(params: StepParams, submit: SubmitCheck) -> None:
    """Every enhance preset a job names is one this domain has (whichever workflow it names)."""
    for index, op in enumerate(params.postprocess):
        if getattr(op, "preset", None) and op.preset not in PRESETS:
            field = f"{submit.where}.postprocess[{index}].preset"
            raise ValidationError(f"{field}: unknown enhance preset {op.preset!r}; known: {', '.join(PRESETS)}",
                                  [{"loc": field}])


def output_size(step: dict[str, Any], params: StepParams, size: tuple[int, int], submit: SubmitCheck) -> tuple:
    """Each upscale multiplies the size; every image on the way within limits.max_output_pixels."""
    for op in step_ops(step["config"], params):
        if op["op"] == "upscale":
            size = upscaled_size(size, op.get("scale"))
            check_output_pixels(size, submit.limits["max_output_pixels"], _scale_field(step, params, op, submit.where))
    return size


# upscale -----------------------------------------------------------------------------------

def load_upscaler(entry, path: Path):
    from spandrel import ImageModelDescriptor, ModelLoader

    descriptor = ModelLoader().load_from_file(str(path))
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ValidationError(f"{entry.id!r} is not an image-to-image model")
    return descriptor.eval()


def upscale(ctx: StepContext, image: Image.Image, op: dict[str, Any]) -> Image.Image:
    limit = ctx.config.get("limits", "max_output_pixels")
    target = upscaled_size(image.size, op.get("scale"))
    check_output_pixels(target, limit, "upscale")
    if not op.get("model"):
        return image.resize(target, Image.Resampling.LANCZOS)
    import numpy as np
    import torch

    device = device_of(ctx)
    model = component_for(ctx, op["model"], "upscaler", lambda entry, path: load_upscaler(entry, path).to(torch_device(device)))
    check_output_pixels(upscaled_size(image.size, model.scale), limit, f"upscale with {op['model']!r} (x{model.scale})")
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    ctx.token.raise_if_set()
    with torch.inference_mode():
        output = model(pixels.to(torch_device(device))).clamp(0, 1)
    array = (output[0].permute(1, 2, 0).float().cpu().numpy() * 255.0).round().astype("uint8")
    result = Image.fromarray(array)
    return result if result.size == target else result.resize(target, Image.Resampling.LANCZOS)


# enhance -----------------------------------------------------------------------------------

def enhance(image: Image.Image, op: dict[str, Any]) -> Image.Image:
    settings = dict(PRESETS.get(op.get("preset") or "", {}))
    if op.get("preset") and op["preset"] not in PRESETS:
        raise ValidationError(f"unknown enhance preset {op['preset']!r}; known: {', '.join(PRESETS)}")
    settings.update({k: v for k, v in op.items() if k not in ("op", "preset") and v is not None})
    image = image.convert("RGB")
    if settings.get("auto_levels"):
        image = ImageOps.autocontrast(image, cutoff=1)
    for key, enhancer in (("sharpness", ImageEnhance.Sharpness), ("contrast", ImageEnhance.Contrast),
                          ("color", ImageEnhance.Color), ("brightness", ImageEnhance.Brightness)):
        if settings.get(key) is not None:
            image = enhancer(image).enhance(float(settings[key]))
    return image


# safety check ------------------------------------------------------------------------------

def load_safety_checker(folder: Path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    return checker.eval(), CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)


def safety_check(ctx: StepContext, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool] | None]:
    folder = ctx.config.get("safety", "model")
    if not folder:
        return images, None
    import numpy as np
    import torch

    path = Path(folder) if Path(folder).is_absolute() else ctx.config.base_dir / folder
    cache = ctx.shared.setdefault("safety_checker", {})
    if str(path) not in cache:
        cache[str(path)] = load_safety_checker(path)
    checker, processor = cache[str(path)]
    clip_input = processor(images=images, return_tensors="pt").pixel_values
    arrays = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images])
    with torch.inference_mode():
        _, flags = checker(images=arrays, clip_input=clip_input)
    flags = [bool(f) for f in flags]
    checked = [Image.new("RGB", img.size) if flag else img for img, flag in zip(images, flags)]
    return checked, flags


# the step ----------------------------------------------------------------------------------

def input_images(ctx: StepContext) -> list[tuple[str, Image.Image, str | None]]:
    """(name stem, image, A1111 parameters) for each image this step works on."""
    found = []
    paths = ctx.previous_images()
    if not paths and ctx.params.init_image:  # the upscale workflow: the job's own picture
        path = resolve_inside(ctx.inbox, ctx.params.init_image, "params.init_image")
        given = read_image(path, "params.init_image", ctx.config.get("limits", "max_image_pixels"),
                           ctx.params.input_digests.get("init_image"))
        found.append((path.stem.split("-s")[0], given.image, given.image.info.get("parameters")))
    for path in paths:
        with Image.open(path) as image:
            image.load()
            found.append((Path(path).stem.split("-s")[0], image.copy(), image.info.get("parameters")))
    if not found:
        raise ValidationError("postprocessing has no image to work on (no earlier images, no init_image)")
    return found


def processing_step(ctx: StepContext) -> StepResult:
    """postprocessing_enhancement: apply this step's ops to the images in hand."""
    ops = ops_for(ctx)
    sources = input_images(ctx)
    images = [image for _, image, _ in sources]
    data: dict[str, Any] = {"ops": ops}
    for number, op in enumerate(ops):
        ctx.token.raise_if_set()
        if op["op"] == "upscale":
            images = [upscale(ctx, image, op) for image in images]
        elif op["op"] == "enhance":
            images = [enhance(image, op) for image in images]
        elif op["op"] == "safety_check":
            images, flags = safety_check(ctx, images)
            data["safety"] = {"flagged": flags} if flags is not None else SAFETY_SKIPPED
        ctx.progress((number + 1) / max(len(ops), 1), op["op"])
    names = []
    described = ", ".join(o["op"] + (f" x{o.get('scale', 2.0)}" if o["op"] == "upscale" else "") for o in ops)
    for (stem, _, parameters), image in zip(sources, images):
        name = f"{stem}-s{ctx.step_index}.png"
        save_png(image, ctx.work_dir / name, ((parameters + ", ") if parameters else "") + f"Postprocess: {described}",
                 ctx.config.get("outbox", "png_compress_level"))
        names.append(name)
    data["sizes"] = [list(image.size) for image in images]
    return StepResult(images=names, data=data)
