"""Stable Diffusion 1.5 (and 2.x): a UNet with one CLIP text encoder, 512 px, classifier-free guidance."""

from engine.domains.families import SD_SCHEDULERS, Family, register

FAMILY = register(Family(
    name="sd15", label="SD 1.5", denoiser="unet",
    pipelines={"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
               "inpaint": "StableDiffusionInpaintPipeline", "controlnet": "StableDiffusionControlNetPipeline"},
    size_multiple=8, native_size=512, steps=30, guidance_scale=7.0, guidance="cfg", schedulers=SD_SCHEDULERS,
    # Last of the UNet families: a folder with one text encoder and a UNet.
    recognise_index=lambda index: "unet" in index and "text_encoder_2" not in index,
    recognise_keys=lambda joined: "model.diffusion_model." in joined and "conditioner.embedders.1" not in joined,
))
