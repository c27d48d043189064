"""Writes a diffusers SD 1.5-class pipeline folder as one original-format (LDM) `.safetensors`
checkpoint, the single-file layout most shared checkpoints come in, so the tests can load such a
file offline through the engine's real loading code.

The key layout is the original Stable Diffusion one: `model.diffusion_model.*` (UNet: input,
middle and output blocks), `first_stage_model.*` (VAE: encoder.down / decoder.up, 1x1-conv
attention) and `cond_stage_model.transformer.*` (the CLIP text model as it is).
"""

from __future__ import annotations

import re
from pathlib import Path

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_FIXED = {"conv_norm_out": "norm_out"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_parts(rest: str, names: dict[str, str]) -> str:
    for new, old in names.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    per_block = layers_per_block + 1
    for new, old in UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        block, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{block * per_block + layer + 1}.0.{_rename_parts(rest, RESNET_NAMES)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{int(m[1]) * per_block + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_parts(m[2], RESNET_NAMES)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * per_block + int(m[2])}.0.{_rename_parts(m[3], RESNET_NAMES)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * per_block + layers_per_block}.{slot}.conv.{m[2]}"
    raise ValueError(f"no original-format name for UNet key {key}")


def vae_key(key: str, up_block_count: int) -> str:
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    rest = _rename_parts(rest, VAE_FIXED)
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        rest = f"down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
        rest = f"down.{m[1]}.downsample.conv.{m[2]}"
    elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        rest = f"up.{up_block_count - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
        rest = f"up.{up_block_count - 1 - int(m[1])}.upsample.conv.{m[2]}"
    elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        rest = f"mid.attn_1.{_rename_parts(m[1], VAE_ATTENTION_NAMES)}"
    return f"{part}.{rest}"


def write_ldm_checkpoint(pipeline_folder: Path, path: Path) -> Path:
    """The SD 1.5-class diffusers pipeline in pipeline_folder, as one original-format file."""
    import json

    from safetensors.torch import load_file, save_file

    folder = Path(pipeline_folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    with_attention = {i for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind}
    tensors = {}
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        tensors["model.diffusion_model." + unet_key(key, unet_config["layers_per_block"], with_attention)] = value
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name = vae_key(key, len(vae_config["up_block_types"]))
        if ".mid.attn_1." in name and value.dim() == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        tensors["first_stage_model." + name] = value
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        # transformers 5 saves the CLIP text model without its `text_model.` prefix; originals have it
        name = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + name] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
