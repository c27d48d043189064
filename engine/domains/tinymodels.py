"""Tiny models built in code: random weights that draw noise, for the demo and the tests.

Nothing here is downloaded. Each builder writes a folder that the real loading code reads back,
saved with safetensors, so the demo and the tests exercise the same paths as a real model.
Their pipelines make 64x64 pictures when a job gives no size (the smallest the default limits allow).
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_VOCAB = ["<|startoftext|>", "<|endoftext|>", "!"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _write_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(TINY_VOCAB)}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=77,
        pad_token="!",
    )
    tokenizer.save_pretrained(folder)


def _text_encoder(projection: bool, hidden: int, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(TINY_VOCAB) + 26,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-architecture pipeline (random weights) as a diffusers folder."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=8 * 6 + 16,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    tokenizer_dir = folder.parent / (folder.name + ".tokenizer-src")
    _write_tokenizer(tokenizer_dir)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(False, 16, seed + 2),
        text_encoder_2=_text_encoder(True, 16, seed + 3),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return folder


def build_tiny_upscaler(path: Path, scale: int = 2, seed: int = 0) -> Path:
    """A tiny ESRGAN (RRDBNet) upscaler saved as safetensors, loadable through spandrel."""
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def build_tiny_controlnet(folder: Path, pipeline_folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL ControlNet derived from a tiny pipeline's UNet (random weights)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_folder) / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8))
    controlnet.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_tiny_lora(path: Path, pipeline_folder: Path, seed: int = 0) -> Path:
    """A tiny LoRA for a tiny SDXL pipeline's UNet, in the diffusers LoRA safetensors format."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_folder) / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    path = Path(path)
    StableDiffusionXLPipeline.save_lora_weights(path.parent, unet_lora_layers=get_peft_model_state_dict(unet),
                                                weight_name=path.name, safe_serialization=True)
    return path


def build_tiny_sd15(folder: Path, seed: int = 0) -> Path:
    """A tiny SD 1.5-architecture pipeline (one CLIP text encoder, random weights) as a diffusers folder."""
    import shutil

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    tokenizer_dir = folder.parent / (folder.name + ".tokenizer-src")
    _write_tokenizer(tokenizer_dir)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(False, 16, seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return folder


def build_tiny_safety_checker(folder: Path, seed: int = 0, flag_everything: bool = False) -> Path:
    """A tiny StableDiffusionSafetyChecker and its CLIP image processor, saved to a folder.
    `flag_everything` lowers every concept's threshold below any score, so each image is flagged."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    if flag_everything:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-10.0)
    checker.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)
