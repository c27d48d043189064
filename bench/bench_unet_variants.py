"""Which settings make SDXL's calls faster at one batch size, each variant in its own process so
their settings cannot leak into each other (pipeline called directly, no engine):

    python bench/bench_unet_variants.py [--batch 8] [--variants eager,cudnn,compiled,tuned]

eager: stock diffusers; cudnn: stock with cuDNN's attention preferred; compiled: channels_last and
torch.compile (reduce-overhead) of the UNet and the VAE decoder, as the engine's compiled path;
benchmark: compiled, with cuDNN's convolution autotuning (cudnn.benchmark); flags: benchmark, plus
inductor's conv_1x1_as_mm and no epilogue fusion; tuned: compiled, plus fused QKV projections,
cuDNN attention and inductor's tuning flags (conv_1x1_as_mm, coordinate descent, no epilogue fusion);
fp8: compiled, with the UNet's linear layers in float8 (torchao's dynamic activation and weight
quantization, one scale per row; Hopper-class GPUs). Prints images/s per variant and the compile
seconds; with --save, the PSNR of each variant's last images against the first variant's at the same
seeds; writes $OUT/unet_variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import in_own_process  # noqa: E402


def quantize_fp8(unet) -> int:
    """The UNet's linear layers (those float8 matmuls can take: sizes multiples of 16) in float8 with
    dynamic per-row scales; how many were quantized."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    chosen = []

    def suitable(module, name: str) -> bool:
        ok = isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
        if ok:
            chosen.append(name)
        return ok

    # one scale per row needs bfloat16 weights; the fp16 pipelines here take one scale per tensor
    granularity = PerRow() if unet.dtype == torch.bfloat16 else PerTensor()
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=suitable)
    return len(chosen)


def one(variant: str, folder: Path, batch: int, steps: int, size: int, calls: int, save: Path | None = None) -> dict:
    import torch

    from bench_gpu import load_direct

    pipe, _ = load_direct(folder)
    quantized = quantize_fp8(pipe.unet) if variant == "fp8" else 0
    if variant in ("cudnn", "tuned"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch.backends.cuda.enable_cudnn_sdp(True)
        preferred = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]
        sdpa_kernel(preferred, set_priority=True).__enter__()  # for the rest of this process
    if variant in ("benchmark", "flags"):
        torch.backends.cudnn.benchmark = True
    if variant == "flags":
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.epilogue_fusion = False
    if variant in ("compiled", "benchmark", "flags", "tuned", "fp8"):
        if variant == "tuned":
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.epilogue_fusion = False
            pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", dynamic=False)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode="reduce-overhead", dynamic=False)

    def call(n: int):
        return pipe(prompt=["a lighthouse at dusk"] * n, num_inference_steps=steps, width=size, height=size,
                    guidance_scale=7.0, generator=[torch.Generator("cuda").manual_seed(s) for s in range(n)]).images

    started = time.perf_counter()
    call(batch)
    call(batch)  # CUDA graphs are recorded on a later run than the first
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(calls):
        images = call(batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for seed, image in enumerate(images):
            image.save(save / f"{variant}-{seed}.png")
    return {"variant": variant, "batch": batch, "first_two_calls_s": round(first, 1),
            "images_per_s": round(batch * calls / seconds, 4), "seconds_per_call": round(seconds / calls, 3),
            **({"fp8_linear_layers": quantized} if variant == "fp8" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-compile-gpu/model"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--variants", default="eager,cudnn,compiled,tuned")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--save", type=Path, help="keep each variant's last images here and compare them")
    args = parser.parse_args()
    from engine.app import quiet_libraries

    quiet_libraries()
    if args.one:
        print(json.dumps(one(args.one, args.folder, args.batch, args.steps, args.size, args.calls, args.save)))
        return
    if not args.folder.exists():
        from bench_gpu import build_sdxl

        build_sdxl(args.folder)
    results = []
    for variant in args.variants.split(","):
        arguments = ["--folder", str(args.folder), "--batch", str(args.batch), "--steps", str(args.steps), "--size",
                     str(args.size), "--calls", str(args.calls), *(["--save", str(args.save)] if args.save else [])]
        results.append({"variant": variant, **in_own_process(__file__, variant, arguments, args.timeout)})
        if args.save and "error" not in results[-1] and variant != results[0]["variant"]:
            from bench_compile_gpu import psnr

            first = results[0]["variant"]
            values = sorted(psnr(args.save / f"{first}-{n}.png", args.save / f"{variant}-{n}.png")
                            for n in range(args.batch) if (args.save / f"{first}-{n}.png").exists())
            if values:
                results[-1]["psnr_vs_" + first] = {"min": round(values[0], 2), "median": round(values[len(values) // 2], 2)}
        print(json.dumps(results[-1]), flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "unet_variants.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
