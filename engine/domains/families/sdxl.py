"""Stable Diffusion XL: a UNet with two CLIP text encoders, 1024 px, classifier-free guidance."""

from engine.domains.families import SD_SCHEDULERS, Family, register

FAMILY = register(Family(
    name="sdxl", label="SDXL", denoiser="unet",
    pipelines={"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
               "inpaint": "StableDiffusionXLInpaintPipeline", "controlnet": "StableDiffusionXLControlNetPipeline"},
    size_multiple=8, native_size=1024, steps=30, guidance_scale=7.0, guidance="cfg", schedulers=SD_SCHEDULERS,
    recognise_index=lambda index: "unet" in index and "text_encoder_2" in index,
    recognise_keys=lambda joined: "model.diffusion_model." in joined and "conditioner.embedders.1" in joined,
    lora_keys=lambda joined: any(k in joined for k in ("text_encoder_2.", "lora_te2_", "te2.")),
))
