"""What a new process pays to reach its first compiled image when this machine's compile caches are
present, by part, for the whole denoiser and for its repeated blocks alone (`[compile] scope`):

    python bench/bench_warm_start.py --model FOLDER [--device cuda] [--size 1024] [--scopes whole,regional]

For each scope: `engine warmup` fills a fresh cache (a process of its own, its seconds reported),
then a new process loads the pipeline through the engine's loading code, makes one eager call, and
two compiled calls: the first compiled call's seconds over the second's is what compiling from the
caches costs (dynamo's tracing, the caches' loads), beside dynamo's own account of it. Writes
$OUT/warm_start.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import in_own_process  # noqa: E402


def probe(config_path: Path, device_kind: str, size: int, steps: int, images: int = 1) -> dict:
    """In this process: load, one eager call, two compiled calls; each part's seconds."""
    started = time.perf_counter()
    import torch

    from engine.config import load_config
    from engine.domains import accelerate
    from engine.domains.catalogue import ModelRegistry, folder_fingerprint
    from engine.domains.device import discover
    from engine.domains.model import load_pipeline

    config = load_config(config_path)
    device = next(d for d in discover() if d.kind == device_kind)
    entry = ModelRegistry(config.models_dir).get("sdxl", "pipeline")
    folder = entry.location(config.models_dir)
    imported = time.perf_counter()
    dtype = torch.float16 if device_kind == "cuda" else torch.float32
    pipe = load_pipeline(entry, folder, device, dtype)
    loaded = time.perf_counter()

    def call() -> float:
        begun = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(0)
        pipe(prompt="warm", num_images_per_prompt=images, num_inference_steps=steps, width=size, height=size, generator=generator,
             output_type="np")
        if device_kind == "cuda":
            torch.cuda.synchronize()
        return round(time.perf_counter() - begun, 3)

    eager = call()
    begun = time.perf_counter()
    accelerated = accelerate.prepare(pipe, config, device.name, folder_fingerprint(folder))
    prepared = round(time.perf_counter() - begun, 3)
    with accelerated.compiled_in(pipe):
        first, second = call(), call()
    from torch._dynamo.utils import compilation_time_metrics

    dynamo = {name: round(sum(compilation_time_metrics.get(name, [])), 3)
              for name in ("_compile.compile_inner", "bytecode_tracing", "OutputGraph.call_user_compiler",
                           "AOTAutogradCache.inductor_load", "PyCodeCache.load_by_key_path")}
    return {"imports_s": round(imported - started, 2), "load_s": round(loaded - imported, 2), "eager_call_s": eager,
            "prepare_s": prepared, "first_compiled_call_s": first, "second_compiled_call_s": second,
            "compiling_from_caches_s": round(first - second, 2), "dynamo_s": dynamo,
            "to_first_compiled_image_s": round(time.perf_counter() - started - second, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a diffusers SDXL folder")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--scopes", default="whole,regional")
    parser.add_argument("--images", type=int, default=1, help="images a call")
    parser.add_argument("--mode", default="default")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-warm-start"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--probe", "--one", type=Path, help=argparse.SUPPRESS)  # a config: this process probes it
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.device, args.size, args.steps, args.images)))
        return
    runs = []
    for scope in args.scopes.split(","):
        root = args.folder / scope
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / "config.toml"
        config_path.write_text(f'[compile]\nbatch_sizes = [1]\nbackend = "inductor"\nmode = "{args.mode}"\n'
                               f'scope = "{scope}"\ncache = "{root / "compile-cache"}"\n'
                               f'[device]\npreferred = "{args.device}"\n')
        env = {**os.environ, "ENGINE_CONFIG": str(config_path)}
        engine = [sys.executable, "-m", "engine"]
        subprocess.run(engine + ["init"], env=env, capture_output=True, check=True)
        subprocess.run(engine + ["models", "add", str(args.model), "--id", "sdxl", "--replace"], env=env,
                       capture_output=True, check=True)
        begun = time.perf_counter()
        warmed = subprocess.run(engine + ["warmup", "sdxl", "--sizes", f"{args.size}x{args.size}", "--batch-sizes",
                                          "1", "--steps", str(args.steps), "--json"], env=env, capture_output=True,
                                text=True)
        run = {"scope": scope, "warmup_process_s": round(time.perf_counter() - begun, 1),
               "warmup": warmed.stdout.strip()[-400:] or warmed.stderr[-800:]}
        run.update(in_own_process(__file__, str(config_path), [
            "--device", args.device, "--size", str(args.size), "--steps", str(args.steps), "--images", str(args.images),
            "--model", str(args.model)], timeout=1800))
        runs.append(run)
        print(json.dumps(run), flush=True)
    out = args.out or Path(os.environ.get("OUT", args.folder)) / "warm_start.json"
    out.write_text(json.dumps({"device": args.device, "size": args.size, "steps": args.steps, "mode": args.mode,
                               "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
