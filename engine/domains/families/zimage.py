"""Z-Image (Turbo): a single-stream transformer with a Qwen3 text encoder, flow matching, 1024 px on
a grid of 16. Turbo is distilled to 9 steps without guidance; classifier-free guidance (and so a
negative prompt) applies only with guidance_scale above 1."""

from engine.domains.families import FLOW_SCHEDULERS, Family, register

FAMILY = register(Family(
    name="zimage", label="Z-Image", denoiser="transformer",
    pipelines={"txt2img": "ZImagePipeline", "img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline"},
    size_multiple=16, native_size=1024, steps=9, guidance_scale=0.0, guidance="cfg_above_1",
    schedulers=FLOW_SCHEDULERS,
    recognise_index=lambda index: index.get("_class_name", "").startswith("ZImage"),
    loras=False,
    half="bf16",
))
