"""GPU benchmark: a full-size SDXL-architecture pipeline with random weights (SDXL's published
configs), saved as safetensors, registered, and run txt2img at 1024x1024, 30 steps: sessions end
to end through one long-lived engine runner, alternating image by image with the same pipeline
called directly in the same process.

    python bench/bench_gpu.py [--folder /tmp/engine-gpu] [--images 5] [--rounds 2] [--steps 30] [--size 1024]

Prints figures and writes them to $OUT/gpu_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=False, use_linear_projection=True,
)
VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.13025, up_block_types=["UpDecoderBlock2D"] * 4, force_upcast=True,
)
TEXT_1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
                 num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")


def build_sdxl(folder: Path) -> float:
    """Random-weight SDXL (about 3.5 billion parameters), built on the GPU, saved in fp16."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from engine.tinymodels import _write_tokenizer

    started = time.perf_counter()
    tokenizer_dir = folder.parent / "tokenizer-src"
    _write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    with torch.device("cuda"):
        torch.manual_seed(0)
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_1)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=UNet2DConditionModel(**UNET), scheduler=EulerDiscreteScheduler(**SCHEDULER))
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def direct(folder: Path, out: Path, prompts: list[str], steps: int, size: int, pipe=None):
    """The same pipeline called directly, saving the same PNGs: what a hand-rolled script does."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from engine.outbox import a1111_parameters, save_png

    load = 0.0
    if pipe is None:
        started = time.perf_counter()
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16, use_safetensors=True).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        load = time.perf_counter() - started
    torch.cuda.synchronize()
    started = time.perf_counter()
    each = []
    for n, prompt in enumerate(prompts):
        one = time.perf_counter()
        generator = torch.Generator("cuda").manual_seed(n)
        image = pipe(prompt=prompt, num_inference_steps=steps, width=size, height=size, guidance_scale=7.0,
                     generator=[generator]).images[0]
        save_png(image, out / f"direct-{n}.png", a1111_parameters({"prompt": prompt, "steps": steps}, n))
        each.append(round(time.perf_counter() - one, 3))
    torch.cuda.synchronize()
    return pipe, load, time.perf_counter() - started, each


class EngineRounds:
    """One engine installation (one runner process-wide model cache) driven in rounds of sessions."""

    def __init__(self, folder: Path, root: Path) -> None:
        from engine import app
        from engine.config import load_config
        from engine.intake import Intake
        from engine.registry import ModelRegistry

        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text('[database]\nsynchronous = "FULL"\n')
        self.config = load_config(root / "config.toml")
        self.store = app.init(self.config)
        ModelRegistry(self.config.models_dir).add(folder, "sdxl-random")
        self.intake = Intake(self.config)
        from engine.runner import Runner

        # One long-lived runner, as `engine run` is: its worker thread (and the CUDA handles that
        # thread holds) and its warm model cache last across rounds.
        self.runner = Runner(self.config, self.store, app.registry_for(self.config))
        self.submitted = 0

    def round(self, prompts: list[str], steps: int, size: int) -> dict:
        from sqlalchemy import text

        from engine import commands
        from engine.jobs import parse_job

        first = self.submitted
        for n, prompt in enumerate(prompts):
            job = {"workflow": "txt2img", "params": {"model": "sdxl-random", "prompt": prompt, "width": size,
                                                      "height": size, "steps": steps, "guidance_scale": 7.0, "seed": n}}
            commands.submit(self.store, self.intake, parse_job(job), commands.Source(f"gpu-{self.submitted}.json", "x"))
            self.submitted += 1
        started = time.perf_counter()
        self.runner.run(until_idle=True)
        wall = time.perf_counter() - started
        with self.store.read() as conn:
            rows = conn.execute(text(
                "SELECT st.duration_s, st.output FROM steps st JOIN sessions s ON s.session_id = st.session_id "
                "WHERE st.step_type = 'inference_generation' ORDER BY s.created_event")).all()[first:]
            statuses = [r[0] for r in conn.execute(text("SELECT status FROM sessions"))]
        outputs = [json.loads(r[1])["data"] for r in rows]
        return {"wall_s": round(wall, 3), "inference_s": [round(r[0], 3) for r in rows],
                "all_completed": set(statuses) == {"completed"},
                "peak_memory_gib": round(max(o["peak_memory_bytes"] or 0 for o in outputs) / 2**30, 2),
                "dtype": outputs[0]["dtype"], "device": outputs[0]["device"]}

    def loads(self) -> list[dict]:
        from sqlalchemy import text

        with self.store.read() as conn:
            return [json.loads(r[0]) for r in conn.execute(text("SELECT data FROM event_log WHERE type = 'model.loaded'"))]


def main() -> None:
    import statistics

    import torch

    from engine.app import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-gpu"))
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="times through the prompts, alternating")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    shutil.rmtree(args.folder, ignore_errors=True)
    model = args.folder / "sdxl-random"
    images = args.folder / "direct"
    images.mkdir(parents=True)
    prompts = [f"a lighthouse at dusk, variation {n}" for n in range(args.images)]
    figures: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "images": args.images,
                     "rounds": args.rounds, "steps": args.steps, "size": args.size}
    figures["build_s"] = round(build_sdxl(model), 1)
    # Warm-up of both: the engine's first session also loads its model (the only load it may make).
    pipe, figures["direct_load_s"], _, _ = direct(model, images, ["warm-up"], 10, args.size)
    engine = EngineRounds(model, args.folder / "engine")
    figures["engine_warmup"] = engine.round(["warm-up"], 10, args.size)
    # Interleaved image by image (a direct image, then one engine session), so drift of the GPU's
    # clocks and of the host hits both alike.
    direct_each, engine_rounds = [], []
    for _ in range(args.rounds):
        for prompt in prompts:
            _, _, seconds, _ = direct(model, images, [prompt], args.steps, args.size, pipe)
            direct_each.append(round(seconds, 3))
            engine_rounds.append(engine.round([prompt], args.steps, args.size))
    engine_each = [r["wall_s"] for r in engine_rounds]
    loads = engine.loads()
    count = len(direct_each)
    figures.update({
        "direct_s_each": direct_each, "engine_session_wall_s_each": engine_each,
        "engine_inference_step_s_each": [r["inference_s"][0] for r in engine_rounds],
        "engine_all_completed": all(r["all_completed"] for r in engine_rounds),
        "engine_peak_memory_gib": max(r["peak_memory_gib"] for r in engine_rounds),
        "engine_dtype": engine_rounds[0]["dtype"], "engine_device": engine_rounds[0]["device"],
        "engine_model_loads": len(loads), "engine_sessions": engine.submitted,
        "engine_load_s": loads[0]["seconds"] if loads else None,
        "direct_images_per_s": round(count / sum(direct_each), 4),
        "engine_images_per_s": round(count / sum(engine_each), 4),
        "median_direct_image_s": statistics.median(direct_each),
        "median_engine_session_s": statistics.median(engine_each),
        "pairwise_ratios": [round(d / e, 3) for d, e in zip(direct_each, engine_each)],
    })
    figures["ratio_engine_to_direct"] = round(figures["engine_images_per_s"] / figures["direct_images_per_s"], 4)
    print(json.dumps(figures, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bench.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
