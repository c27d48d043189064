"""GPU benchmark of batched and coalesced generation, all in one run on one machine:

1. raw diffusers (the pipeline called directly) at batch sizes 1, 2, 4 and 8;
2. a batch of --batch-items items through the engine (preferred and max batch size 8);
3. --singles single sessions submitted together, coalescing off, then on.

    python bench/bench_batch_gpu.py [--steps 30] [--size 1024] [--images 8] [--batch-items 32] [--singles 16]
    python bench/bench_batch_gpu.py --tiny --steps 3 --size 64     # the script itself, on a CPU

The model is SDXL's architecture with random weights (bench_gpu.build_sdxl), fp16 on CUDA. Each
figure is images/s over wall time, with the GPU-busy share from the driver's samples where NVML is
there. Prints a table; writes every figure to $OUT/batch_gpu.json when OUT is set.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import GpuSamples, device_name, ensure_model, load_direct, synchronize  # noqa: E402


def span(samples: GpuSamples, work) -> dict:
    """Wall time of work() (returns the images it made), GPU-busy share over it."""
    since = int(time.time() * 1e6)
    synchronize()
    started = time.perf_counter()
    images = work()
    synchronize()
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 4),
            **samples.since(since)}


def raw_diffusers(folder: Path, sizes: list[int], images: int, steps: int, size: int, samples: GpuSamples) -> dict:
    import torch

    pipe, _ = load_direct(folder)
    pipe(prompt="warm up", num_inference_steps=steps, width=size, height=size, guidance_scale=7.0)

    def calls(batch: int):
        def work() -> int:
            for start in range(0, images, batch):
                seeds = list(range(start, min(start + batch, images)))
                generators = [torch.Generator(device_name()).manual_seed(s) for s in seeds]
                pipe(prompt=["a lighthouse at dusk"] * len(seeds), num_inference_steps=steps, width=size, height=size,
                     guidance_scale=7.0, generator=generators)
            return images
        return work

    figures = {str(batch): span(samples, calls(batch)) for batch in sizes}
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return figures


class Engine:
    """A complete installation with one long-lived runner, as `engine run` is."""

    def __init__(self, folder: Path, root: Path, compile_setting: str = "", mode: str | None = None,
                 cache: Path | None = None) -> None:
        from engine import app
        from engine.config import load_config

        root.mkdir(parents=True, exist_ok=True)
        settings = "[batching]\ncoalesce = true\nmax_batch_size = 8\n[compile]\nbatch_sizes = [1, 8]\n"
        settings += f'mode = "{mode}"\n' if mode else ""
        settings += f'cache = "{cache}"\n' if cache else ""
        (root / "config.toml").write_text(settings)
        self.config = load_config(root / "config.toml")
        self.engine = app.Engine.create(self.config)
        self.store = self.engine.store
        self.engine.models.add(folder, "sdxl-random", compile_setting=compile_setting)
        self.intake = self.engine.intake
        self.runner = self.engine.runner()

    def submit(self, job: dict) -> str:
        from engine import commands
        from engine.ingest.jobs import parse_job

        return commands.submit(self.store, self.intake, parse_job(job), commands.Source("bench.json", "x")).target_id

    def run(self) -> None:
        self.runner.run(until_idle=True)

    def query(self, sql: str, **params) -> list:
        from sqlalchemy import text

        with self.store.read() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]


def calls_made(engine: Engine) -> dict[str, float]:
    """call id -> seconds inside the pipeline call, for every inference call made so far."""
    return {data["call_id"]: data["group_seconds"] for data in (json.loads(row[0])["data"] for row in engine.query(
        "SELECT output FROM steps WHERE step_type = 'inference_generation' AND status = 'completed'"))}


def measured(engine: Engine, samples: GpuSamples, work) -> dict:
    """span() of work, with the seconds spent inside pipeline calls and the rest (the engine's own
    time: claims, saving, recording, the batch's summary and contact sheet)."""
    before = calls_made(engine)
    figures = span(samples, work)
    inside = sum(seconds for call, seconds in calls_made(engine).items() if call not in before)
    return {**figures, "seconds_in_calls": round(inside, 3), "seconds_outside_calls": round(figures["seconds"] - inside, 3)}


def compare_runs(engine: Engine, singles: int) -> dict:
    """The same prompt and seed made alone (coalescing off) and in a shared call (on): the largest
    channel difference (out of 255) and the lowest PSNR over the pairs: the determinism bound here."""
    import numpy as np
    from PIL import Image

    rows = engine.query("SELECT session_id, params FROM sessions ORDER BY created_event")
    by_seed: dict[int, list] = {}
    for session_id, params in rows:
        seed = json.loads(params)["seed"]
        if 500 <= seed < 500 + singles:
            folder = engine.config.outbox / session_id
            by_seed.setdefault(seed, []).append(next(folder.glob("*.png")))
    largest, psnrs = 0, []
    for first, second in (pair for pair in by_seed.values() if len(pair) == 2):
        a = np.asarray(Image.open(first), dtype=np.int16)
        b = np.asarray(Image.open(second), dtype=np.int16)
        largest = max(largest, int(np.abs(a - b).max()))
        mse = float(((a - b).astype(np.float64) ** 2).mean())
        psnrs.append(float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse))
    return {"pairs": len(psnrs), "max_channel_difference": largest,
            "min_psnr_db": round(min(psnrs), 2) if psnrs else None}


def engine_figures(folder: Path, root: Path, items: int, singles: int, steps: int, size: int,
                   samples: GpuSamples) -> dict:
    engine = Engine(folder, root)
    params = {"model": "sdxl-random", "width": size, "height": size, "steps": steps, "guidance_scale": 7.0}
    engine.submit({"workflow": "txt2img", "params": {**params, "prompt": "warm up", "seed": 1}})
    engine.run()  # the model load and the first call are not measured

    def batch() -> int:
        engine.submit({"kind": "batch", "workflow": "txt2img", "params": {**params, "prompt": "a lighthouse at dusk"},
                       "matrix": {"product": {"seed": list(range(100, 100 + items))}},
                       "batch": {"preferred_batch_size": 8, "max_batch_size": 8}})
        engine.run()
        return items

    figures = {"batch": measured(engine, samples, batch)}

    def dynamic() -> int:  # preferred size 1: the calls are sized from the memory measured so far
        engine.submit({"kind": "batch", "workflow": "txt2img", "params": {**params, "prompt": "a harbour"},
                       "matrix": {"product": {"seed": list(range(300, 300 + items // 2))}},
                       "batch": {"preferred_batch_size": 1, "max_batch_size": 8, "dynamic_sizing": True}})
        engine.run()
        return items // 2

    figures["batch_dynamic"] = measured(engine, samples, dynamic)
    figures["memory_profiles"] = engine.query(
        "SELECT model_id, width, height, mode, per_image_bytes, available_bytes, call_images FROM memory_profiles")
    figures["batch_metrics"] = [dict(zip(("total_batches", "average_batch_time", "memory_usage_peak",
                                          "images_per_second", "status"), row)) for row in engine.query(
        "SELECT total_batches, average_batch_time, memory_usage_peak, images_per_second, status FROM batch_status "
        "ORDER BY created_at")]
    for coalesce in (False, True):
        engine.runner.batching["coalesce"] = coalesce

        def together() -> int:
            for n in range(singles):
                engine.submit({"workflow": "txt2img", "params": {**params, "prompt": f"single {n}", "seed": 500 + n}})
            engine.run()
            return singles

        figures[f"singles_coalesce_{'on' if coalesce else 'off'}"] = measured(engine, samples, together)
    figures["alone_vs_coalesced"] = compare_runs(engine, singles)
    calls = [json.loads(row[0])["data"] for row in engine.query(
        "SELECT output FROM steps WHERE step_type = 'inference_generation' AND status = 'completed'")]
    figures["call_sizes"] = sorted({c["call_id"]: c["call_images"] for c in calls}.values())
    figures["statuses"] = engine.query("SELECT status, count(*) FROM sessions GROUP BY 1")
    figures["model_loads"] = engine.query("SELECT count(*) FROM event_log WHERE type = 'model.loaded'")[0][0]
    engine.runner.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-batch-gpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=8, help="images per raw batch size")
    parser.add_argument("--batch-items", type=int, default=32)
    parser.add_argument("--singles", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL instead (to try the script on a CPU)")
    args = parser.parse_args()
    from engine.app import quiet_libraries

    quiet_libraries()
    model = ensure_model(args.folder, args.tiny)
    samples = GpuSamples()
    started = time.perf_counter()
    raw = raw_diffusers(model, [1, 2, 4, 8], args.images, args.steps, args.size, samples)
    shutil.rmtree(args.folder / "engine", ignore_errors=True)
    engine = engine_figures(model, args.folder / "engine", args.batch_items, args.singles, args.steps, args.size,
                            samples)
    best = max(raw.values(), key=lambda f: f["images_per_s"])
    result = {
        "device": device_name(), "steps": args.steps, "size": args.size, "raw": raw, "engine": engine,
        "batch_vs_best_raw": round(engine["batch"]["images_per_s"] / best["images_per_s"], 3),
        "coalesced_vs_not": round(engine["singles_coalesce_on"]["images_per_s"]
                                  / engine["singles_coalesce_off"]["images_per_s"], 3),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if device_name() == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name(0)
    print(f"{'what':<34} {'images':>6} {'seconds':>8} {'images/s':>9} {'GPU busy %':>10} {'outside calls s':>15}")
    rows = [(f"raw diffusers, batch size {b}", f) for b, f in raw.items()] + [
        (f"engine, a {args.batch_items}-item batch", engine["batch"]),
        (f"engine, {args.batch_items // 2} items, dynamic size", engine["batch_dynamic"]),
        (f"engine, {args.singles} singles, coalescing off", engine["singles_coalesce_off"]),
        (f"engine, {args.singles} singles, coalescing on", engine["singles_coalesce_on"])]
    for label, f in rows:
        print(f"{label:<34} {f['images']:>6} {f['seconds']:>8.1f} {f['images_per_s']:>9.3f} "
              f"{f.get('gpu_util_pct') if f.get('gpu_util_pct') is not None else '-':>10} "
              f"{f.get('seconds_outside_calls', '-'):>15}")
    print(f"engine batch / best raw: {result['batch_vs_best_raw']}; coalesced / not: {result['coalesced_vs_not']}; "
          f"call sizes {engine['call_sizes']}; model loads {engine['model_loads']}; statuses {engine['statuses']}")
    print(f"alone vs coalesced, same seeds: {engine['alone_vs_coalesced']}")
    print(f"memory profiles: {engine['memory_profiles']}; batch metrics: {engine['batch_metrics']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "batch_gpu.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
