"""A probe of the SDXL UNet alone on a GPU (random weights, 1024x1024, a batch of 8 with CFG: 16
samples a step), each variant in a process of its own, to plan the float8 and ahead-of-time runs:

    python bench/probe_unet_gpu.py            # all variants; results in $OUT/probe.json

eager-fp16, eager-fp8 (engine.domains.float8 on a bfloat16 UNet), compiled-fp8 (torch.compile,
default mode: the compile's seconds and the step's), aoti-fp16-build (torch.export and
AOTInductor, weights left out of the package), aoti-fp16-load (a new process: package and weights
loaded, then steps), aoti-fp8-build/-load likewise. Each variant reports seconds a step (median of
5 after 2 warm-ups) and, against the fp16 eager output on the same inputs, the relative error.
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
    if precision == "fp8":
        from engine.domains.float8 import to_float8

        to_float8(unet)
    return unet.to(memory_format=torch.channels_last)


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

    ref_path = FOLDER / "ref.pt"
    if not ref_path.exists():
        return None
    ref = torch.load(ref_path).float()
    return float((out.float() - ref).norm() / ref.norm())


def one(variant: str) -> dict:
    import torch

    started = time.perf_counter()
    precision = "fp8" if "fp8" in variant else "fp16"
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    result: dict = {"variant": variant}
    module = flat(build(precision))
    result["build_seconds"] = round(time.perf_counter() - started, 1)
    args = inputs(dtype)
    package = FOLDER / f"unet-{precision}.pt2"
    if variant.startswith("eager"):
        call = module
    elif variant.startswith("compiled"):
        call = torch.compile(module, mode="default", dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            call(*args)
        torch.cuda.synchronize()
        result["compile_seconds"] = round(time.perf_counter() - start, 1)
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
        torch.save(out.cpu(), FOLDER / "ref.pt")
    result["relative_error_vs_fp16_eager"] = reference_error(out.cpu())
    result["step_seconds"] = round(timed(call, args), 4)
    return result


STARTED = time.perf_counter()
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
