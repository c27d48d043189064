"""A probe of the SDXL UNet alone on a GPU (random weights, 1024x1024, a batch of 8 with CFG: 16
samples a step; PROBE_SAMPLES=2 for one image), each variant in a process of its own, to plan the
float8 and ahead-of-time runs:

    python bench/probe_unet_gpu.py [VARIANT,...]       # results in $OUT/probe.json

A variant is HOW-PRECISION[+ro]. HOW: eager; compiled (torch.compile of the whole UNet); regional
(its repeated blocks compiled, as `[compile] scope = "regional"`); aoti-...-build / -load /
-loadcopy (torch.export and AOTInductor, weights left out of the package; a new process loads it).
PRECISION: fp16, bf16, fp8 (engine.domains.float8 on a bfloat16 UNet, scales per row), fp8tensor
(one scale per tensor) or ao (torchao's float8 on the same layers, scales per row). +ro: mode
reduce-overhead (CUDA graphs) instead of default. Each variant reports seconds a step (median of 5
after 2 warm-ups) and, against the fp16 eager output on the same inputs (run eager-fp16 first), the
relative error, and what dynamo did (graphs, graph breaks and their reasons); with
PROBE_PROFILE=1, where one step's GPU time goes (matrix products, float8 ones apart, convolutions,
attention, inductor's fused kernels, the rest) and its largest kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FOLDER = Path("/tmp/probe")
SAMPLES = int(os.environ.get("PROBE_SAMPLES", "16"))


def build(precision: str):
    import torch
    from diffusers import UNet2DConditionModel

    from bench_gpu import UNET

    with torch.device("cuda"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET)
    unet = unet.to(torch.float16 if precision == "fp16" else torch.bfloat16).eval()
    if precision.startswith("fp8"):
        from engine.domains.float8 import to_float8

        to_float8(unet, "tensor" if precision == "fp8tensor" else "row")
    if precision == "ao":  # torchao's float8 (tensor subclasses), one scale per row, on the same layers
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        from engine.domains.float8 import swappable

        quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda module, name: swappable(name, module))
    return unet.to(memory_format=torch.channels_last)


def compile_regionally(unet, mode: str) -> int:
    """The UNet's repeated blocks compiled in place (as the engine's regional scope); how many."""
    from engine.domains.accelerate import repeated_blocks

    blocks = repeated_blocks(unet)
    for block in blocks.values():
        block.compile(mode=mode, dynamic=False)
    return len(blocks)


KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
         ("matmul-fp8", ("f8f8", "e4m3", "fp8", "f8_")),
         ("conv", ("conv", "fprop", "dgrad", "implicit", "winograd", "xmma_fprop")),
         ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90")),
         ("fused (triton)", ("triton",)))


def dynamo_account() -> dict:
    """What dynamo did while compiling: graphs (a recompile is one more), graph breaks (their main reasons)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values()),
            "break_reasons": [reason[:160] for reason, _ in breaks.most_common(4)]}


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, marks in KINDS if any(mark in name for mark in marks)), "other")


def profile(call, args) -> dict:
    """One step's GPU time by kind of kernel, and its largest kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile as profiled

    with torch.no_grad(), profiled(activities=[ProfilerActivity.CUDA]) as prof:
        call(*args)
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()]
    total = sum(ms for _, ms, _ in kernels) or 1.0
    kinds: dict = {}
    for name, ms, _ in kernels:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    top = sorted(kernels, key=lambda k: -k[1])[:25]
    return {"gpu_ms": round(total, 2), "share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": name[:110], "ms": round(ms, 3), "count": count} for name, ms, count in top]}


def flat(unet):
    import torch

    class Flat(torch.nn.Module):
        def __init__(self, unet) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, context, text_embeds, time_ids):
            return self.unet(sample, timestep, context, added_cond_kwargs={"text_embeds": text_embeds,
                                                                           "time_ids": time_ids}, return_dict=False)[0]

    return Flat(unet)


def inputs(dtype):
    import torch

    generator = torch.Generator("cuda").manual_seed(1)
    def r(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)
    return (r(SAMPLES, 4, 128, 128), torch.tensor(500.0, device="cuda"), r(SAMPLES, 77, 2048), r(SAMPLES, 1280),
            torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * SAMPLES, device="cuda").to(dtype))


def timed(call, args) -> float:
    import torch

    with torch.no_grad():
        for _ in range(2):
            call(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            call(*args)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[2]


def reference_error(out) -> float | None:
    import torch

    ref_path = FOLDER / f"ref-{SAMPLES}.pt"
    if not ref_path.exists():
        return None
    ref = torch.load(ref_path).float()
    return float((out.float() - ref).norm() / ref.norm())


def one(variant: str) -> dict:
    import torch

    started = time.perf_counter()
    how, *rest = variant.partition("+")[0].split("-")
    precision = next(token for token in rest if token in PRECISIONS)
    mode = "reduce-overhead" if variant.endswith("+ro") else "default"
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    result: dict = {"variant": variant, "samples": SAMPLES}
    unet = build(precision)
    module = flat(unet)
    result["build_seconds"] = round(time.perf_counter() - started, 1)
    args = inputs(dtype)
    package = FOLDER / f"unet-{precision}.pt2"
    if how == "eager":
        call = module
    elif how in ("compiled", "regional"):
        if how == "regional":
            result["blocks_compiled"] = compile_regionally(unet, mode)
            call = module
        else:
            call = torch.compile(module, mode=mode, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            call(*args)
        torch.cuda.synchronize()
        result["compile_seconds"] = round(time.perf_counter() - start, 1)
        result["dynamo"] = dynamo_account()
    elif variant.endswith("build"):
        start = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(module, args, strict=False)
        result["export_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                  inductor_configs={"aot_inductor.package_constants_in_so": False})
        result["aoti_seconds"] = round(time.perf_counter() - start, 1)
        result["package_bytes"] = package.stat().st_size
        return result
    else:  # load
        start = time.perf_counter()
        loaded = torch._inductor.aoti_load_package(str(package))
        result["package_load_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        print("loaded", loaded.get_metadata(), file=sys.stderr, flush=True)
        loaded.load_constants({n: state[n] for n in loaded.get_constant_fqns()}, check_full_update=True,
                              user_managed=not variant.endswith("copy"))
        print("constants in", file=sys.stderr, flush=True)
        result["constants_seconds"] = round(time.perf_counter() - start, 2)
        call = loaded
    start = time.perf_counter()
    with torch.no_grad():
        out = call(*args)
    torch.cuda.synchronize()
    result["first_call_seconds"] = round(time.perf_counter() - start, 2)
    result["process_to_first_step_seconds"] = round(time.perf_counter() - STARTED, 1)
    if variant == "eager-fp16":
        torch.save(out.cpu(), FOLDER / f"ref-{SAMPLES}.pt")
    result["relative_error_vs_fp16_eager"] = reference_error(out.cpu())
    result["step_seconds"] = round(timed(call, args), 4)
    if os.environ.get("PROBE_PROFILE") == "1" and "+ro" not in variant:
        result["profile"] = profile(call, args)
    return result


STARTED = time.perf_counter()
PRECISIONS = ("fp16", "bf16", "fp8", "fp8tensor", "ao")
VARIANTS = ["eager-fp16", "eager-fp8", "compiled-fp8", "aoti-fp16-build", "aoti-fp16-load", "aoti-fp16-loadcopy",
            "compiled-fp16", "aoti-fp8-build", "aoti-fp8-load"]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])), flush=True)
        return
    FOLDER.mkdir(parents=True, exist_ok=True)
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else VARIANTS
    budget = float(os.environ.get("PROBE_SECONDS", "560"))
    results = []
    for variant in wanted:
        left = budget - (time.perf_counter() - STARTED)
        if left < 20:
            results.append({"variant": variant, "skipped": "out of time"})
            continue
        try:
            done = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--one", variant],
                                  capture_output=True, text=True, timeout=left)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"variant": variant, "rc": done.returncode,
                                                                 "error": done.stderr[-3000:]})
        except subprocess.TimeoutExpired:
            results.append({"variant": variant, "error": f"timed out after {left:.0f} s"})
        print(json.dumps(results[-1]), flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
