"""PNG files with their generation parameters, as AUTOMATIC1111 writes them (readable by the
tools people use): what the domains write their images with. Knows nothing of the store.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from engine.files import atomic_write_bytes
from engine.outbox import sheets


# The scheduler names here, and diffusers' classes, as AUTOMATIC1111 names its samplers.
A1111_SAMPLERS = {
    "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras",
    "dpm++sde": "DPM++ SDE", "pndm": "PLMS", "lms": "LMS", "heun": "Heun", "unipc": "UniPC",
    "DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun", "UniPCMultistepScheduler": "UniPC",
}


def a1111_sampler(scheduler: str | None, scheduler_class: str | None = None) -> str | None:
    """AUTOMATIC1111's name of the sampler used: the one asked for, else the model's own."""
    return A1111_SAMPLERS.get(scheduler or "") or A1111_SAMPLERS.get(scheduler_class or "") or scheduler_class


def _a1111_value(value: Any) -> str:
    """A value as AUTOMATIC1111 writes it: quoted when it holds a comma, colon or quote."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"') else text


def a1111_parameters(params: dict[str, Any], seed: int, extra: dict[str, Any] | None = None) -> str:
    """The generation parameters as AUTOMATIC1111 writes them (readable by tools people use):
    LoRAs as <lora:name:scale> in the prompt and their hashes in `Lora hashes`, the model's short
    hash in `Model hash` and a ControlNet as the ControlNet extension writes it (`extra` carries
    what only the step knows: the sampler used, the hashes)."""
    loras = params.get("loras") or []
    prompt = " ".join([params.get("prompt", ""), *(f"<lora:{l['model']}:{l['scale']}>" for l in loras)]).strip()
    lines = [prompt]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = {
        "Steps": params.get("steps"),
        "Sampler": a1111_sampler(params.get("scheduler")),
        "CFG scale": params.get("guidance_scale"),
        "Seed": seed,
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Model hash": None,
        "Model": params.get("model"),
    }
    if params.get("init_image"):
        fields["Denoising strength"] = params.get("strength")
    controlnet = params.get("controlnet")
    if controlnet:
        fields["ControlNet 0"] = (f"Module: none, Model: {controlnet['model']}, "
                                  f"Weight: {controlnet.get('conditioning_scale', 1.0)}, "
                                  f"Guidance Start: {controlnet.get('guidance_start', 0.0)}, "
                                  f"Guidance End: {controlnet.get('guidance_end', 1.0)}")
    fields.update(extra or {})
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str | None, compress_level: int = 6) -> None:
    """A PNG with a `parameters` text chunk, written under a temporary name and renamed
    (`compress_level`: zlib's, 0-9; `[outbox] png_compress_level`)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=info, compress_level=compress_level)
    atomic_write_bytes(path, encoded.getvalue())
    sheets.tiles.remember(path, image)


def parameters_of(png: Path) -> str:
    """The AUTOMATIC1111 parameters text a PNG carries ("" when it carries none or cannot be read)."""
    try:
        with Image.open(png) as image:
            return str(image.info.get("parameters") or getattr(image, "text", {}).get("parameters") or "")
    except (OSError, ValueError):
        return ""
