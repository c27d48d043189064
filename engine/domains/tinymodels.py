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


# The flow-matching transformer families (engine.domains.families): FLUX.1, SD 3.5, Z-Image. Their
# tokenizers are built in code too (transformers 5's tokenizers take their vocabulary as data).

def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5(seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8))


def _clip_tokenizer(folder: Path):
    import shutil

    from transformers import CLIPTokenizer

    source = folder.parent / (folder.name + ".tokenizer-src")
    _write_tokenizer(source)
    tokenizer = CLIPTokenizer.from_pretrained(source)
    shutil.rmtree(source, ignore_errors=True)
    return tokenizer


def _flow_vae(seed: int, shift: float = 0.0, scale: float = 1.0, latent_channels: int = 4):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale)


def build_tiny_flux(folder: Path, seed: int = 0, schnell: bool = False) -> Path:
    """A tiny FLUX.1-architecture pipeline (dev: a guidance embedding; schnell: none) as a diffusers folder."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, guidance_embeds=not schnell, axes_dims_rope=[2, 2, 4])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=not schnell, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                shift=1.0 if schnell else 3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=_flow_vae(seed + 1, 0.0609, 1.5035),
                        text_encoder=_text_encoder(False, 16, seed + 2), tokenizer=_clip_tokenizer(folder),
                        text_encoder_2=_t5(seed + 3), tokenizer_2=_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """A tiny SD 3.5-architecture pipeline (MMDiT with a dual-attention layer and RMS q/k norm,
    two CLIP encoders and T5) as a diffusers folder."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=32, out_channels=16,
                                        pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm")
    tokenizer = _clip_tokenizer(folder)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(seed + 1, latent_channels=16),
                                    text_encoder=_text_encoder(True, 16, seed + 2), tokenizer=tokenizer,
                                    text_encoder_2=_text_encoder(True, 16, seed + 3), tokenizer_2=tokenizer,
                                    text_encoder_3=_t5(seed + 4), tokenizer_3=_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_zimage(folder: Path, seed: int = 0) -> Path:
    """A tiny Z-Image-architecture pipeline (a Qwen3 text encoder, its chat template) as a diffusers folder."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    folder = Path(folder)
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for letter in "abcdefghijklmnopqrstuvwxyz\u0120":
        vocab[letter] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # created with torch.empty: fixed so that no NaN comes of them
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                          max_position_embeddings=512, head_dim=8))
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          vae=_flow_vae(seed + 1, 0.1159, 0.3611), text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_transformer_controlnet(folder: Path, pipeline_folder: Path, seed: int = 0) -> Path:
    """A tiny ControlNet for a tiny FLUX.1 or SD 3.5 pipeline (a diffusers folder), made from its
    transformer as diffusers makes one (one block; random weights, so it changes the picture)."""
    import json

    import diffusers
    import torch

    torch.manual_seed(seed)
    pipeline_folder = Path(pipeline_folder)
    name = json.loads((pipeline_folder / "model_index.json").read_text())["transformer"][1]
    transformer = getattr(diffusers, name).from_pretrained(pipeline_folder / "transformer")
    if name == "FluxTransformer2DModel":
        controlnet = diffusers.FluxControlNetModel.from_transformer(
            transformer, num_layers=1, num_single_layers=1, attention_head_dim=transformer.config.attention_head_dim,
            num_attention_heads=transformer.config.num_attention_heads, load_weights_from_transformer=False)
    else:
        controlnet = diffusers.SD3ControlNetModel.from_transformer(transformer, num_layers=1,
                                                                   num_extra_conditioning_channels=0,
                                                                   load_weights_from_transformer=False)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)  # its zero-initialised outputs: no effect else
    controlnet.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_tiny_flux_lora(path: Path, pipeline_folder: Path, seed: int = 0) -> Path:
    """A tiny LoRA for a tiny FLUX pipeline's transformer, in the diffusers LoRA safetensors format."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_pretrained(Path(pipeline_folder) / "transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                       init_lora_weights=False))
    path = Path(path)
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   weight_name=path.name, safe_serialization=True)
    return path
