"""GPU benchmark: a full-size SDXL-architecture pipeline with random weights (SDXL's published
configs), saved as safetensors, registered, and run txt2img at 1024x1024, 30 steps: sessions end
to end through one long-lived engine runner, alternating image by image with the same pipeline
called directly in the same process.

    python bench/bench_gpu.py [--seconds 420] [--steps 30] [--size 1024] [--folder /tmp/engine-gpu]
    python bench/bench_gpu.py --pool bench/results/gpu-h100-*.json     # several runs together
    python bench/bench_gpu.py --tiny --seconds 10 --steps 4 --size 64  # the script itself, on a CPU

Pairs (one image called directly, one engine session; the order swapped every pair) run until
--seconds are spent. Every call of the pipeline class is timed on whichever thread makes it, with
the calling thread's CPU time, the host's steal time and the driver's GPU-busy samples, so the
figures separate the diffusers call from what the engine adds around it. Prints figures and
writes them to $OUT/gpu_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import threading
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


def build_sdxl(folder: Path) -> None:
    """Random-weight SDXL (about 3.5 billion parameters), built on the GPU, saved in fp16."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from engine.domains.tinymodels import _write_tokenizer

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


def ensure_model(folder: Path, tiny: bool = False) -> Path:
    """folder/model: the random-weight SDXL (or, with tiny, the tests' tiny SDXL), built once."""
    model = folder / "model"
    if not model.exists():
        if tiny:
            from engine.domains.tinymodels import build_tiny_sdxl

            build_tiny_sdxl(model)
        else:
            build_sdxl(model)
    return model


def in_own_process(script: str, one: str, arguments: list[str], timeout: float) -> dict:
    """`script --one ONE ARGUMENTS` in a process of its own (so no setting of one variant leaks
    into the next): the last JSON line it printed, or what went wrong."""
    import subprocess

    try:
        done = subprocess.run([sys.executable, script, "--one", one, *arguments], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": done.stderr[-800:]}


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_direct(folder: Path):
    """The pipeline as a hand-rolled script loads it."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    started = time.perf_counter()
    dtype = torch.float16 if device_name() == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).to(device_name())
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - started


def direct(pipe, out: Path, prompt: str, seed: int, steps: int, size: int) -> float:
    """One image from the pipeline called directly, saved as the engine saves it: what a
    hand-rolled script does. Returns its wall time."""
    import torch

    from engine.outbox.png import a1111_parameters, save_png

    started = time.perf_counter()
    generator = torch.Generator(device_name()).manual_seed(seed)
    image = pipe(prompt=prompt, num_inference_steps=steps, width=size, height=size, guidance_scale=7.0,
                 generator=[generator]).images[0]
    save_png(image, out / f"direct-{seed}.png", a1111_parameters({"prompt": prompt, "steps": steps}, seed))
    return time.perf_counter() - started


def cpu_steal_s() -> float | None:
    """Seconds of CPU time the host took from this machine's CPUs so far (all CPUs together)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class GpuSamples:
    """The driver's own samples of GPU utilisation over a span (no sampling thread), and why the
    clocks are held back, if they are. Diagnostics: where NVML is missing or refuses, left out."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - any failure here only drops the diagnostics
            self.nvml = None

    def since(self, microseconds: int) -> dict:
        if self.nvml is None:
            return {}
        out = {}
        try:
            _, samples = self.nvml.nvmlDeviceGetSamples(self.handle, self.nvml.NVML_GPU_UTILIZATION_SAMPLES,
                                                         microseconds)
            values = [s.sampleValue.uiVal for s in samples if s.timeStamp >= microseconds]
            out["gpu_util_pct"] = round(sum(values) / len(values), 1) if values else None
        except Exception:  # noqa: BLE001
            out["gpu_util_pct"] = None
        try:
            out["clock_event_reasons"] = int(self.nvml.nvmlDeviceGetCurrentClocksEventReasons(self.handle))
        except Exception:  # noqa: BLE001
            out["clock_event_reasons"] = None
        return out


class CallLog:
    """Times every call of the pipeline class, on whichever thread makes it, tagged with the arm
    (direct or engine) being measured: the diffusers call itself, apart from what surrounds it."""

    def __init__(self) -> None:
        self.arm = "warm-up"
        self.calls: list[dict] = []
        self.gpu = GpuSamples()

    def install(self, cls) -> None:
        import functools

        original = cls.__call__
        log = self

        @functools.wraps(original)
        def timed(pipe, *args, **kwargs):
            synchronize()
            steal, thread_cpu, started = cpu_steal_s(), time.thread_time(), time.perf_counter()
            since = int(time.time() * 1e6)
            try:
                return original(pipe, *args, **kwargs)
            finally:
                synchronize()
                wall = time.perf_counter() - started
                stolen = cpu_steal_s()
                log.calls.append({
                    "arm": log.arm, "wall_s": round(wall, 4),
                    "thread_cpu_s": round(time.thread_time() - thread_cpu, 4),
                    "host_steal_s": round(stolen - steal, 3) if stolen is not None and steal is not None else None,
                    "thread": threading.current_thread().name, **log.gpu.since(since)})

        cls.__call__ = timed


class EngineRounds:
    """One engine installation (one runner process-wide model cache) driven in rounds of sessions."""

    def __init__(self, folder: Path, root: Path) -> None:
        from engine import app
        from engine.config import load_config

        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text('[database]\nsynchronous = "FULL"\n')
        self.config = load_config(root / "config.toml")
        self.engine = app.Engine.create(self.config)
        self.store = self.engine.store
        self.engine.models.add(folder, "sdxl-random")
        self.intake = self.engine.intake

        # One long-lived runner, as `engine run` is: its worker thread (and the CUDA handles that
        # thread holds) and its warm model cache last across rounds.
        self.runner = self.engine.runner()
        self.submitted = 0

    def session(self, prompt: str, seed: int, steps: int, size: int) -> dict:
        """One txt2img session end to end: submitted, run to its end by the runner, outbox written."""
        from sqlalchemy import text

        from engine import commands
        from engine.ingest.jobs import parse_job

        job = {"workflow": "txt2img", "params": {"model": "sdxl-random", "prompt": prompt, "width": size,
                                                  "height": size, "steps": steps, "guidance_scale": 7.0, "seed": seed}}
        started = time.perf_counter()
        commands.submit(self.store, self.intake, parse_job(job), commands.Source(f"gpu-{self.submitted}.json", "x"))
        self.runner.run(until_idle=True)
        wall = time.perf_counter() - started
        self.submitted += 1
        with self.store.read() as conn:
            status, output = conn.execute(text(
                "SELECT s.status, st.output FROM steps st JOIN sessions s ON s.session_id = st.session_id "
                "WHERE st.step_type = 'inference_generation' ORDER BY s.created_event DESC LIMIT 1")).one()
        data = json.loads(output)["data"]
        return {"wall_s": wall, "completed": status == "completed", "device": data["device"], "dtype": data["dtype"],
                "peak_memory_gib": round((data["peak_memory_bytes"] or 0) / 2**30, 2)}

    def loads(self) -> list[dict]:
        from sqlalchemy import text

        with self.store.read() as conn:
            return [json.loads(r[0]) for r in conn.execute(text("SELECT data FROM event_log WHERE type = 'model.loaded'"))]


def ratio_interval(runs: list[list[tuple[float, float]]], draws: int = 5000) -> tuple[float, float]:
    """95% bootstrap interval of engine images/s over direct images/s: (direct s, engine s) pairs
    drawn again with replacement within each run (runs on different machines stay apart)."""
    rng = random.Random(0)
    ratios = []
    for _ in range(draws):
        direct_total = engine_total = 0.0
        for pairs in runs:
            for _ in pairs:
                d, e = pairs[rng.randrange(len(pairs))]
                direct_total, engine_total = direct_total + d, engine_total + e
        ratios.append(direct_total / engine_total)
    ratios.sort()
    return round(ratios[int(0.025 * draws)], 4), round(ratios[int(0.975 * draws) - 1], 4)


def summary(*runs: tuple[list[float], list[float]]) -> dict:
    """Engine against direct over one or more runs, each (direct seconds, engine seconds) per pair."""
    direct_s = [d for run in runs for d in run[0]]
    engine_s = [e for run in runs for e in run[1]]
    low, high = ratio_interval([list(zip(*run)) for run in runs])
    return {"pairs": len(direct_s), "direct_images_per_s": round(len(direct_s) / sum(direct_s), 4),
            "engine_images_per_s": round(len(engine_s) / sum(engine_s), 4),
            "ratio": round(sum(direct_s) / sum(engine_s), 4), "ratio_95ci": [low, high],
            "median_pairwise_ratio": round(statistics.median(d / e for d, e in zip(direct_s, engine_s)), 4),
            "median_direct_s": round(statistics.median(direct_s), 3),
            "median_engine_s": round(statistics.median(engine_s), 3)}


def call_seconds(figures: dict, arm: str) -> list[float]:
    return [c["wall_s"] for c in figures["calls"] if c["arm"] == arm]


def outside_call_ms(figures: dict, arm: str) -> list[float]:
    """Per image: what surrounds the diffusers call (PNG writing; for the engine also its steps)."""
    each = figures["direct_s_each" if arm == "direct" else "engine_s_each"]
    return [1000 * (whole - call) for whole, call in zip(each, call_seconds(figures, arm))]


def pooled(paths: list[Path]) -> dict:
    """The figures of several runs (their gpu_bench.json files) taken together."""
    return {"runs": [str(p) for p in paths], **taken_together([json.loads(Path(p).read_text()) for p in paths])}


def taken_together(runs: list[dict]) -> dict:
    """Engine against direct over the pairs of one run or several (each run's raw figures)."""
    busy = [c["gpu_util_pct"] for r in runs for c in r["calls"] if c["arm"] in ("direct", "engine")
            and c.get("gpu_util_pct")]
    engine_ms = [ms for r in runs for ms in outside_call_ms(r, "engine")]
    direct_ms = [ms for r in runs for ms in outside_call_ms(r, "direct")]
    return {
        "end_to_end": summary(*[(r["direct_s_each"], r["engine_s_each"]) for r in runs]),
        "diffusers_call_only": summary(*[(call_seconds(r, "direct"), call_seconds(r, "engine")) for r in runs]),
        "engine_outside_call_ms_median": round(statistics.median(engine_ms), 1),
        "direct_outside_call_ms_median": round(statistics.median(direct_ms), 1),
        "engine_adds_ms_median_pairwise": round(statistics.median(e - d for e, d in zip(engine_ms, direct_ms)), 1),
        "engine_model_loads_per_run": [r["engine_model_loads"] for r in runs],
        "engine_sessions_per_run": [r["engine_sessions"] for r in runs],
        "engine_all_completed": all(r["engine_all_completed"] for r in runs),
        "gpu_busy_pct_median": round(statistics.median(busy), 1) if busy else None,  # None: no NVML samples
        "calling_thread_cpu_over_wall": round(
            sum(c["thread_cpu_s"] for r in runs for c in r["calls"] if c["arm"] in ("direct", "engine"))
            / sum(c["wall_s"] for r in runs for c in r["calls"] if c["arm"] in ("direct", "engine")), 3),
    }


def main() -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from engine.app import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-gpu"))
    parser.add_argument("--seconds", type=float, default=420, help="time for the measured pairs")
    parser.add_argument("--max-pairs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL instead (to try the script on a CPU)")
    parser.add_argument("--pool", type=Path, nargs="+", help="only print the figures of these runs taken together")
    args = parser.parse_args()
    if args.pool:
        print(json.dumps(pooled(args.pool), indent=1))
        return
    shutil.rmtree(args.folder, ignore_errors=True)
    model = args.folder / "sdxl-random"
    images = args.folder / "direct"
    images.mkdir(parents=True)
    figures: dict = {"gpu": torch.cuda.get_device_name(0) if device_name() == "cuda" else None,
                     "torch": torch.__version__, "steps": args.steps, "size": args.size, "cpus": os.cpu_count()}
    from engine.domains.tinymodels import build_tiny_sdxl

    started = time.perf_counter()
    (build_tiny_sdxl if args.tiny else build_sdxl)(model)
    figures["build_s"] = round(time.perf_counter() - started, 1)
    calls = CallLog()
    calls.install(StableDiffusionXLPipeline)
    # Warm-up of both: the engine's first session also loads its model (the only load it may make).
    pipe, load_s = load_direct(model)
    figures["direct_load_s"] = round(load_s, 2)
    engine = EngineRounds(model, args.folder / "engine")
    for seed in range(2):
        direct(pipe, images, "warm-up", seed, 10, args.size)
        warm = engine.session("warm-up", seed, 10, args.size)
    figures["engine_device"], figures["engine_dtype"] = warm["device"], warm["dtype"]
    # Pairs until the time is spent, the order swapped every pair (direct first, then engine
    # first), so drift of the GPU's clocks and of the host hits both arms alike.
    direct_s, engine_s, sessions = [], [], []
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds and len(direct_s) < args.max_pairs:
        n = len(direct_s)
        prompt = f"a lighthouse at dusk, variation {n}"
        for arm in (("direct", "engine") if n % 2 == 0 else ("engine", "direct")):
            calls.arm = arm
            if arm == "direct":
                direct_s.append(direct(pipe, images, prompt, n, args.steps, args.size))
            else:
                sessions.append(engine.session(prompt, n, args.steps, args.size))
                engine_s.append(sessions[-1]["wall_s"])
        calls.arm = "between"
    loads = engine.loads()
    figures.update({
        "direct_s_each": [round(x, 3) for x in direct_s], "engine_s_each": [round(x, 3) for x in engine_s],
        "calls": calls.calls, "engine_all_completed": all(s["completed"] for s in sessions),
        "engine_model_loads": len(loads), "engine_sessions": engine.submitted,
        "engine_load_s": loads[0]["seconds"] if loads else None,
        "engine_peak_memory_gib": max(s["peak_memory_gib"] for s in sessions),
    })
    figures.update(taken_together([figures]))
    print(json.dumps({k: v for k, v in figures.items() if k != "calls"}, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bench.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
