"""GPU benchmark of the compiled fast path beside stock diffusers, in phases on one machine:

    python bench/bench_compile_gpu.py --phase cold   # stock, then compile (cache empty), then measure
    python bench/bench_compile_gpu.py --phase warm   # a second process: first image with the cache there
    python bench/bench_compile_gpu.py --tiny --steps 2 --size 64   # the script itself, on a CPU

cold: stock diffusers at batch sizes 1 and 8; `engine warmup` of the compiled model (--batch-sizes,
the seconds it took with an empty cache); an untimed first batch (--warm-items: the runner's own
start), then a --items batch through the engine on the compiled path (with --float32-decode-too,
again with the decoder in float32); the engine's compiled pipeline called directly (--direct-images);
where each call's GPU time went (bench/timeline.py); single sessions one at a time, each timed from
submit to its result.json; the PSNR of the compiled images against stock's at the same seeds (stock's
PNGs are written after its timing). warm: a new process that loads the model
and makes one image, timed from the process's start (the cache from cold present). The model is
SDXL's architecture with random weights (bench_gpu.build_sdxl), fp16. Writes $OUT/compile_<phase>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STARTED = time.perf_counter()  # the warm phase counts from here: the process's start, imports included

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch_gpu import Engine, measured, span  # noqa: E402
from bench_gpu import GpuSamples, device_name, ensure_model, load_direct  # noqa: E402
from timeline import CallTimeline  # noqa: E402

PROMPT = "a lighthouse at dusk"


def stock(folder: Path, steps: int, size: int, samples: GpuSamples, out: Path) -> dict:
    """Stock diffusers at batch sizes 1 and 8; the batch-8 images are kept for the PSNR."""
    import torch

    pipe, _ = load_direct(folder)
    pipe(prompt="warm up", num_inference_steps=steps, width=size, height=size, guidance_scale=7.0)
    figures = {}
    for batch, images in ((1, 3), (8, 8)):
        def work() -> int:
            for start in range(0, images, batch):
                seeds = list(range(100 + start, 100 + min(start + batch, images)))
                made = pipe(prompt=[PROMPT] * len(seeds), num_inference_steps=steps, width=size, height=size,
                            guidance_scale=7.0, generator=[torch.Generator(device_name()).manual_seed(s) for s in seeds])
                if batch == 8:
                    kept.extend(zip(seeds, made.images))
            return images

        kept: list = []
        figures[str(batch)] = span(samples, work)
        for seed, picture in kept:  # saved after the timing: the engine's PNG writes overlap its next call
            picture.save(out / f"stock-{seed}.png")
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return figures


def psnr(first: Path, second: Path) -> float:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(first), dtype=np.float64)
    b = np.asarray(Image.open(second), dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def checkpoint(result: dict, phase: str) -> None:
    """What is measured so far, in $OUT (a run cut off by its time limit still reports it)."""
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"compile_{phase}.json").write_text(json.dumps(result, indent=2, default=str))


def batch_psnr(batch_folder: Path, stock_out: Path) -> dict:
    """The PSNR of a batch's images against stock's at the same seeds: how many, the least, the median."""
    pairs = []
    for item in sorted(batch_folder.glob("item-*")):
        for image in item.glob("*.png"):
            seed = int(image.stem.split("-")[-1])
            if (stock_out / f"stock-{seed}.png").exists():
                pairs.append(psnr(stock_out / f"stock-{seed}.png", image))
    pairs.sort()
    return {"pairs": len(pairs), "min": round(pairs[0], 2) if pairs else None,
            "median": round(pairs[len(pairs) // 2], 2) if pairs else None}


def float32_decode_batch(engine: Engine, args, samples: GpuSamples, timeline: CallTimeline, batch) -> dict:
    """The same batch again with the compiled decoder in float32 (diffusers' upcast) instead of the
    default bfloat16, compiled first: what [compile] vae_upcast = "float32" gives."""
    import torch

    from engine.domains.model import pipeline_for
    from engine.run.warmup import _context, warmup

    cached, _, _ = pipeline_for(_context(engine.config, engine.runner.registry.shared, "sdxl-random", []),
                                "sdxl-random")
    compiled = cached.accelerated.compiled
    default = compiled["vae.decoder"]
    compiled["vae.decoder"] = torch.compile(cached.accelerated.eager["vae.decoder"], mode=args.mode, dynamic=False)
    timeline.arm = "warm-up"
    warmup(engine.config, engine.store, engine.runner.registry.shared, "sdxl-random", [(args.size, args.size)], [8],
           steps=2)
    timeline.arm = "engine-float32-decode"
    figures = measured(engine, samples, batch)
    compiled["vae.decoder"] = default
    return figures


def direct_compiled(engine: Engine, args, samples: GpuSamples, timeline: CallTimeline) -> dict:
    """The engine's own compiled pipeline (warm, in the runner's cache) called directly, 8 images a
    call, as a script would call it: what the engine adds around its calls is the difference."""
    import torch

    from engine.domains.model import pipeline_for
    from engine.run.warmup import _context

    cached, _, _ = pipeline_for(_context(engine.config, engine.runner.registry.shared, "sdxl-random", []),
                                "sdxl-random")
    pipe, accelerated = cached.value, cached.accelerated

    def work() -> int:
        for start in range(0, args.direct_images, 8):
            with accelerated.compiled_in(pipe):
                seeds = range(start, start + 8)
                pipe(prompt=[PROMPT] * 8, num_inference_steps=args.steps, width=args.size, height=args.size,
                     guidance_scale=7.0, generator=[torch.Generator(device_name()).manual_seed(s) for s in seeds])
        return args.direct_images

    timeline.arm = "direct"
    return span(samples, work)


def cold(args, model: Path, samples: GpuSamples) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from engine.run.warmup import warmup

    timeline = CallTimeline()
    if device_name() == "cuda":
        timeline.install(StableDiffusionXLPipeline)

    stock_out = args.folder / "stock"
    stock_out.mkdir(parents=True, exist_ok=True)
    timeline.arm = "stock"
    result = {"stock": stock(model, args.steps, args.size, samples, stock_out)}
    timeline.arm = "warm-up"
    checkpoint(result, "cold")
    engine = Engine(model, args.folder / "engine", compile_setting="on", mode=args.mode)
    started = time.perf_counter()
    result["warmup"] = warmup(engine.config, engine.store, engine.runner.registry.shared, "sdxl-random",
                              [(args.size, args.size)],
                              [int(n) for n in args.batch_sizes.split(",")], steps=args.steps)
    result["warmup_seconds"] = round(time.perf_counter() - started, 1)
    checkpoint(result, "cold")
    params = {"model": "sdxl-random", "width": args.size, "height": args.size, "steps": args.steps,
              "guidance_scale": 7.0}

    def batch() -> int:
        engine.submit({"kind": "batch", "workflow": "txt2img", "params": {**params, "prompt": PROMPT},
                       "matrix": {"product": {"seed": list(range(100, 100 + args.items))}},
                       "batch": {"preferred_batch_size": 8, "max_batch_size": 8}})
        engine.run()
        return args.items

    if args.warm_items:  # a long-running runner's first batch pays its start (threads, imports): not timed
        timeline.arm = "warm-up"
        engine.submit({"kind": "batch", "workflow": "txt2img", "params": {**params, "prompt": PROMPT},
                       "matrix": {"product": {"seed": list(range(9000, 9000 + args.warm_items))}},
                       "batch": {"preferred_batch_size": 8, "max_batch_size": 8}})
        engine.run()
    timeline.arm = "engine"
    result["engine_batch"] = measured(engine, samples, batch)
    checkpoint(result, "cold")
    if args.float32_decode_too:
        result["engine_batch_float32_decode"] = float32_decode_batch(engine, args, samples, timeline, batch)
        checkpoint(result, "cold")
    result["direct_compiled"] = direct_compiled(engine, args, samples, timeline)
    result["timeline"] = timeline.summary()
    checkpoint(result, "cold")
    singles = []
    for n in range(args.singles):
        started = time.perf_counter()
        session = engine.submit({"workflow": "txt2img", "params": {**params, "prompt": f"single {n}", "seed": 900 + n}})
        engine.run()
        singles.append(round(time.perf_counter() - started, 3))
        assert (engine.config.outbox / session / "result.json").exists()
    result["single_session_seconds"] = singles
    result["single_session_median"] = sorted(singles)[len(singles) // 2] if singles else None
    batches = [row[0] for row in engine.query("SELECT batch_id FROM batches ORDER BY created_at")]
    batches = batches[1:] if args.warm_items else batches
    result["psnr_compiled_vs_stock_db"] = batch_psnr(engine.config.outbox / "batches" / batches[0], stock_out)
    if len(batches) > 1:
        result["psnr_float32_decode_vs_stock_db"] = batch_psnr(engine.config.outbox / "batches" / batches[1], stock_out)
    result["events"] = engine.query("SELECT type, data FROM event_log WHERE type LIKE 'model.compile%' ORDER BY seq")
    result["call_sizes"] = sorted({d["call_id"]: d["call_images"] for d in (json.loads(r[0])["data"] for r in engine.query(
        "SELECT output FROM steps WHERE step_type = 'inference_generation' AND status = 'completed'"))}.values())
    best_stock = max(f["images_per_s"] for f in result["stock"].values())
    result["batch_vs_best_stock"] = round(result["engine_batch"]["images_per_s"] / best_stock, 3)
    engine.runner.close()
    return result


def warm(args, model: Path) -> dict:
    """A second engine process on the same machine: the first image, from the process's start."""
    engine = Engine(model, args.folder / "engine-warm", compile_setting="on", mode=args.mode,
                    cache=args.folder / "engine" / "compile-cache")
    session = engine.submit({"workflow": "txt2img", "params": {
        "model": "sdxl-random", "width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": 7.0,
        "prompt": "first", "seed": 1}})
    engine.run()
    seconds = time.perf_counter() - STARTED
    assert (engine.config.outbox / session / "result.json").exists()
    events = engine.query("SELECT type, data FROM event_log WHERE type LIKE 'model.%' ORDER BY seq")
    engine.runner.close()
    return {"first_image_seconds_from_process_start": round(seconds, 1), "events": events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("cold", "warm"), default="cold")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-compile-gpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--singles", type=int, default=3)
    parser.add_argument("--direct-images", type=int, default=16, help="images made by calling the pipeline directly")
    parser.add_argument("--batch-sizes", default="1,8", help="the compiled call sizes warmed up")
    parser.add_argument("--warm-items", type=int, default=8, help="an untimed first batch of this many items")
    parser.add_argument("--float32-decode-too", action="store_true",
                        help="the batch again with the compiled decoder in float32, for comparison")
    parser.add_argument("--mode", default="reduce-overhead")
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL instead (to try the script on a CPU)")
    args = parser.parse_args()
    from engine.app import quiet_libraries

    quiet_libraries()
    model = ensure_model(args.folder, args.tiny)
    if args.phase == "cold":
        import shutil

        shutil.rmtree(args.folder / "engine", ignore_errors=True)
        result = cold(args, model, GpuSamples())
    else:
        import shutil

        shutil.rmtree(args.folder / "engine-warm", ignore_errors=True)
        result = warm(args, model)
    result.update(phase=args.phase, device=device_name(), steps=args.steps, size=args.size, mode=args.mode)
    if device_name() == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name(0)
        result["torch"] = torch.__version__
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=1))
    checkpoint(result, args.phase)


if __name__ == "__main__":
    main()
