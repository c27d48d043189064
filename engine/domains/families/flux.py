"""FLUX.1 (dev, schnell): a rectified-flow transformer with CLIP and T5, guidance distilled into the
model (no negative prompt), 1024 px on a grid of 16. schnell, distilled to few steps, takes no
guidance at all: its transformer has no guidance embedding."""

import json

from engine.domains.families import FLOW_SCHEDULERS, Family, Variant, register

SCHNELL = Variant("schnell", steps=4, guidance_scale=0.0, guidance_fixed=True)


def _variant(folder):
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return None if config.get("guidance_embeds", True) else SCHNELL


FAMILY = register(Family(
    name="flux", label="FLUX.1", denoiser="transformer",
    pipelines={"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline",
               "controlnet": "FluxControlNetPipeline"},
    controlnet_class="FluxControlNetModel",
    size_multiple=16, native_size=1024, steps=28, guidance_scale=3.5, guidance="distilled",
    schedulers=FLOW_SCHEDULERS,
    recognise_index=lambda index: index.get("_class_name", "") == "FluxPipeline",
    # Black Forest Labs' own names (flux1-dev.safetensors), or diffusers' (a transformer saved alone)
    recognise_keys=lambda joined: ("double_blocks." in joined and "single_blocks." in joined)
    or ("single_transformer_blocks." in joined and "x_embedder." in joined and "lora" not in joined),
    lora_keys=lambda joined: "single_transformer_blocks" in joined or "lora_unet_single_blocks" in joined,
    variant_of=_variant,
    variant_of_keys=lambda joined: None if "guidance" in joined else SCHNELL,
    half="bf16",
), variants=(SCHNELL,))
