"""The UNet of a compiled SDXL call measured alone, each variant in its own process:

    python bench/bench_call_parts.py --parts unet:compiled,unet:cudnn,unet:fused

unet:<variant>: the UNet alone at a call of --batch images (classifier-free guidance: twice that
many rows), compiled (reduce-overhead); variants: compiled; cudnn (cuDNN's attention preferred);
fused (fused QKV projections); cudnn+fused. Writes $OUT/call_parts.json.
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


def timed(work, runs: int) -> float:
    """Seconds per run of work(), after two runs that compile and record."""
    import torch

    for _ in range(2):
        work()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(runs):
        work()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / runs


def unet(folder: Path, variant: str, batch: int, size: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float16).to("cuda")
    if "fused" in variant:
        model.fuse_qkv_projections()
    if "cudnn" in variant:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        preferred = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]
        sdpa_kernel(preferred, set_priority=True).__enter__()  # for the rest of this process
    model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    rows, side = 2 * batch, size // 8
    torch.manual_seed(0)
    sample = torch.randn(rows, 4, side, side, device="cuda", dtype=torch.float16)
    text = torch.randn(rows, 77, 2048, device="cuda", dtype=torch.float16)
    added = {"text_embeds": torch.randn(rows, 1280, device="cuda", dtype=torch.float16),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, device="cuda", dtype=torch.float16)}
    step = torch.tensor(500.0, device="cuda")
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(sample, step, encoder_hidden_states=text, added_cond_kwargs=added)
        compile_s = time.perf_counter() - started
        seconds = timed(lambda: compiled(sample, step, encoder_hidden_states=text, added_cond_kwargs=added), 10)
    return {"variant": variant, "images_per_call": batch, "compile_s": round(compile_s, 1),
            "seconds_per_step": round(seconds, 5), "seconds_per_30_steps": round(30 * seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-compile-gpu/model"))
    parser.add_argument("--parts", default="unet:compiled,unet:cudnn,unet:fused")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from engine.app import quiet_libraries

    quiet_libraries()
    if args.one:
        print(json.dumps(unet(args.folder, args.one.partition(":")[2], args.batch, args.size)))
        return
    if not args.folder.exists():
        from bench_gpu import build_sdxl

        build_sdxl(args.folder)
    results = []
    for part in args.parts.split(","):
        results.append({"part": part, **in_own_process(__file__, part, ["--folder", str(args.folder), "--batch",
                                                                        str(args.batch), "--size", str(args.size)],
                                                       args.timeout)})
        print(json.dumps(results[-1]), flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "call_parts.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
