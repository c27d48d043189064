"""FLUX.1-dev on a GPU, random weights of the real architecture (no download): stock diffusers
bf16 eagerly, then what the engine's compiled path does to the pipeline (torch.compile of the
transformer and the VAE decoder, `engine.domains.accelerate`), then the same with the engine's
float8 layers (`engine.domains.float8`), side by side in one process, at the same seeds.

    python bench/bench_flux_gpu.py --out results.json [--size 1024 --steps 28 --guidance 3.5 --calls 2]

Reports images/s per call, the first call's wait (the compile), peak memory, and the PSNR of
float8's pictures against bf16's. Needs a CUDA GPU with about 40 GiB free.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def flux_dev(device, dtype):
    """FLUX.1-dev's architecture (transformer, CLIP-L, T5-XXL, VAE) with random weights, on the GPU."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from engine.domains.tinymodels import _clip_tokenizer, _t5_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(dtype)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768, hidden_act="quick_gelu")).to(dtype)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", is_gated_act=True)).to(dtype)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=_clip_tokenizer(Path("/tmp/bench-tok")),
                        text_encoder_2=t5, tokenizer_2=_t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(pipe, args, seeds):
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    out = pipe(prompt=["a lighthouse at dusk"] * len(seeds), num_inference_steps=args.steps, guidance_scale=args.guidance,
               width=args.size, height=args.size, output_type="pt",
               generator=[torch.Generator("cuda").manual_seed(s) for s in seeds]).images
    torch.cuda.synchronize()
    return time.perf_counter() - started, out.float().cpu()


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="flux_gpu.json")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
               "steps": args.steps, "guidance": args.guidance, "batch": args.batch, "runs": {}}

    def save():
        Path(args.out).write_text(json.dumps(results, indent=2))

    started = time.perf_counter()
    pipe = flux_dev("cuda", torch.bfloat16)
    results["build_seconds"] = round(time.perf_counter() - started, 1)
    seeds = list(range(args.batch))
    pictures = {}

    def run(name):
        torch.cuda.reset_peak_memory_stats()
        first, pictures[name] = timed(pipe, args, seeds)
        calls = [timed(pipe, args, seeds)[0] for _ in range(args.calls)]
        best = min(calls)
        results["runs"][name] = {"first_call_s": round(first, 2), "calls_s": [round(c, 3) for c in calls],
                                 "images_per_s": round(args.batch / best, 4),
                                 "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(name, results["runs"][name], flush=True)
        save()

    run("stock_bf16_eager")
    eager_transformer, eager_decoder = pipe.transformer, pipe.vae.decoder
    for module in (pipe.transformer, pipe.vae):
        module.to(memory_format=torch.channels_last)
    pipe.transformer = torch.compile(eager_transformer, fullgraph=False, dynamic=False)
    pipe.vae.decoder = torch.compile(eager_decoder, fullgraph=False, dynamic=False)
    run("engine_bf16_compiled")
    from engine.domains.float8 import to_float8

    swapped = to_float8(eager_transformer, "row")
    results["float8_layers"] = swapped
    torch._dynamo.reset()
    pipe.transformer = torch.compile(eager_transformer, fullgraph=False, dynamic=False)
    pipe.vae.decoder = torch.compile(eager_decoder, fullgraph=False, dynamic=False)
    run("engine_fp8_compiled")
    stock = results["runs"]["stock_bf16_eager"]["images_per_s"]
    for name, run_result in results["runs"].items():
        run_result["x_stock"] = round(run_result["images_per_s"] / stock, 3)
    results["psnr_fp8_vs_bf16_db"] = round(psnr(pictures["engine_fp8_compiled"], pictures["stock_bf16_eager"]), 2)
    results["psnr_compiled_vs_eager_bf16_db"] = round(psnr(pictures["engine_bf16_compiled"], pictures["stock_bf16_eager"]), 2)
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
