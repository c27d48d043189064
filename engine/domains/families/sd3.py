"""Stable Diffusion 3 / 3.5: an MMDiT transformer with two CLIP encoders and T5, flow matching,
classifier-free guidance, 1024 px on a grid of 16 (8x VAE, 2x2 patches)."""

from engine.domains.families import FLOW_SCHEDULERS, Family, register

FAMILY = register(Family(
    name="sd3", label="SD 3.5", denoiser="transformer",
    pipelines={"txt2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
               "inpaint": "StableDiffusion3InpaintPipeline", "controlnet": "StableDiffusion3ControlNetPipeline"},
    controlnet_class="SD3ControlNetModel",
    size_multiple=16, native_size=1024, steps=28, guidance_scale=4.5, guidance="cfg", schedulers=FLOW_SCHEDULERS,
    recognise_index=lambda index: index.get("_class_name", "").startswith("StableDiffusion3"),
    recognise_keys=lambda joined: ("joint_blocks." in joined and "context_block" in joined)
    or ("transformer_blocks." in joined and "pos_embed.proj." in joined and "context_embedder." in joined),
    lora_keys=lambda joined: "transformer." in joined and "single_transformer_blocks" not in joined
    and "transformer_blocks" in joined and "add_q_proj" in joined,
    half="bf16",
))
