"""FLUX.1-dev and SD 3.5-large on a GPU, through `engine run` beside stock diffusers, in one run:
random weights of the real architectures (no download), saved as a diffusers folder in bfloat16,
registered three times (eager; compiled; compiled with float8), at the same seeds and prompt.

    python bench/bench_families_gpu.py --family flux                     # on a GPU: $OUT/families_flux.json
    python bench/bench_families_gpu.py --family sd3 --arms stock,eager   # SD 3.5-large
    python bench/bench_families_gpu.py --tiny --family flux --size 64 --steps 2 --backend eager  # on a CPU

Arms, each a process of its own (so each loads the model once, and frees the GPU when it ends):
`stock` (the folder loaded with the family's diffusers pipeline in bfloat16, called image by image as
a hand-rolled script does), then `eager`, `compiled` and `fp8` (an installation's `engine run
--until-idle`: a batch of --calls + 1 seeds, one image a call). Reported for each: its load seconds,
the first call's wait (for the compiled arms, the compile), each later call's seconds inside the
pipeline call (the engine's own figure, `group_seconds`) and images/s over them, the peak of GPU
memory; and for every engine arm the PSNR of its pictures against stock's at each seed.

From a checkout that is not pip-installed (a GPU machine with PYTHONPATH set), first
`ln -sfn ../migrations engine/migrations` (the installed package maps migrations/ there). The
whole transformer's compile takes longer than 150 s on an H100: give --arm-seconds 300 or more, or
--scope regional.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "a lighthouse at dusk, oil on canvas"
PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
GUIDANCE = {"flux": 3.5, "sd3": 4.5}
ARMS = {"eager": ("off", "bf16"), "compiled": ("on", "bf16"), "fp8": ("on", "fp8")}  # compile, precision


def clip(dtype, hidden: int, layers: int, heads: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
                            hidden_act="quick_gelu" if hidden == 768 else "gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).to(dtype)


def t5_xxl(dtype):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", is_gated_act=True)).to(dtype)


def flow_vae(dtype, scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=scaling,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False).to(dtype)


def build(family: str, folder: Path) -> None:
    """The real architecture with random weights, built on the GPU, saved in bfloat16."""
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    from engine.domains.tinymodels import _clip_tokenizer, _t5_tokenizer

    dtype = torch.bfloat16
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(folder.parent / "tokenizer-src")
    with torch.device("cuda"):
        if family == "flux":  # FLUX.1-dev: 19 double and 38 single blocks, 3072 wide, a guidance embedding
            pipe = FluxPipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
                vae=flow_vae(dtype, 0.3611, 0.1159), text_encoder=clip(dtype, 768, 12, 12, False), tokenizer=tokenizer,
                text_encoder_2=t5_xxl(dtype), tokenizer_2=_t5_tokenizer(),
                transformer=FluxTransformer2DModel(guidance_embeds=True).to(dtype))
        else:  # SD 3.5-large: 38 MMDiT blocks, 64 heads of 64, RMS q/k norm
            pipe = StableDiffusion3Pipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=flow_vae(dtype, 1.5305, 0.0609),
                text_encoder=clip(dtype, 768, 12, 12, True), tokenizer=tokenizer,
                text_encoder_2=clip(dtype, 1280, 32, 20, True), tokenizer_2=tokenizer,
                text_encoder_3=t5_xxl(dtype), tokenizer_3=_t5_tokenizer(),
                transformer=SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                                  attention_head_dim=64, num_attention_heads=38,
                                                  caption_projection_dim=2432, joint_attention_dim=4096,
                                                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                                                  qk_norm="rms_norm").to(dtype))
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()


def build_tiny(family: str, folder: Path) -> None:
    from engine.domains.tinymodels import build_tiny_flux, build_tiny_sd3

    (build_tiny_flux if family == "flux" else build_tiny_sd3)(folder)


def stock(args) -> dict:
    """The folder as a hand-rolled script runs it: loaded in bfloat16, one image a call."""
    import diffusers
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    started = time.perf_counter()
    pipe = getattr(diffusers, PIPELINES[args.family]).from_pretrained(
        args.folder / "model", torch_dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    calls, pictures = [], args.folder / "stock"
    pictures.mkdir(exist_ok=True)
    for seed in range(args.calls + 1):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        image = pipe(prompt=PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE[args.family],
                     width=args.size, height=args.size,
                     generator=torch.Generator(device).manual_seed(seed)).images[0]
        if cuda:
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - started)
        image.save(pictures / f"{seed}.png")
    return {"load_s": round(load_s, 1), "first_call_s": round(calls[0], 2), "calls_s": [round(c, 3) for c in calls[1:]],
            "images_per_s": round(len(calls[1:]) / sum(calls[1:]), 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def engine_arm(args, arm: str) -> dict:
    """One `engine run --until-idle` of a fresh installation whose model is registered as `arm` says."""
    import shutil

    from sqlalchemy import text

    from engine import app, commands
    from engine.config import load_config
    from engine.ingest.jobs import parse_job
    from engine.store.events import epoch_of

    root = args.folder / f"engine-{arm}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "config.toml").write_text(
        f'[models]\nfp8_scaling = "row"\n[batching]\ncoalesce = false\nmax_batch_size = 1\n'
        f'[compile]\nbatch_sizes = [1]\nbackend = "{args.backend}"\nmode = "{args.mode}"\nscope = "{args.scope}"\n'
        f'cache = "{root / "compile-cache"}"\nbackground = false\n')
    config = load_config(root / "config.toml")
    engine = app.Engine.create(config)
    compile_setting, precision = ARMS[arm]
    engine.models.add(args.folder / "model", "m", compile_setting=compile_setting, precision=precision)
    job = {"kind": "batch", "workflow": "txt2img", "matrix": {"product": {"seed": list(range(args.calls + 1))}},
           "params": {"model": "m", "prompt": PROMPT, "width": args.size, "height": args.size, "steps": args.steps,
                      "guidance_scale": GUIDANCE[args.family]},
           "batch": {"preferred_batch_size": 1, "max_batch_size": 1}}
    commands.submit(engine.store, engine.intake, parse_job(job), commands.Source("bench.json", "x"))
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"],
                          env={**os.environ, "ENGINE_CONFIG": str(root / "config.toml")}, capture_output=True, text=True,
                          timeout=args.arm_seconds)

    def rows(sql: str) -> list:
        with engine.store.read() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]

    calls = []
    for output, finished in rows("SELECT output, finished_at FROM steps WHERE step_type = 'inference_generation' "
                                 "AND status = 'completed' ORDER BY finished_at"):
        data = json.loads(output)["data"]
        calls.append({"at": round(epoch_of(finished) - started, 2), "inside": data["group_seconds"],
                      "compiled": data["compiled"], "precision": data["precision"], "peak": data.get("peak_memory_bytes")})
    loaded = [json.loads(d) for (d,) in rows("SELECT data FROM event_log WHERE type = 'model.loaded'")]
    compiled = [json.loads(d) for (d,) in rows("SELECT data FROM event_log WHERE type LIKE 'model.compile%'")]
    later = [c["inside"] for c in calls[1:]]
    pictures = {}
    for result in config.outbox.glob("batches/*/item-*/result.json"):
        report = json.loads(result.read_text())
        if report["status"] == "completed":
            pictures[report["params"]["seed"]] = result.parent / report["images"][0]
    psnrs = [round(psnr(args.folder / "stock" / f"{seed}.png", path), 2) for seed, path in sorted(pictures.items())
             if (args.folder / "stock" / f"{seed}.png").exists()]
    peaks = [c["peak"] for c in calls if c.get("peak")]
    return {"returncode": done.returncode, "process_s": round(time.time() - started, 1),
            "load_s": loaded[0].get("seconds") if loaded else None,
            "first_image_s_from_process_start": calls[0]["at"] if calls else None,
            "first_call_s": calls[0]["inside"] if calls else None, "calls_s": later,
            "compiled": [c["compiled"] for c in calls], "precision": calls[0]["precision"] if calls else None,
            "compile_events": compiled, "images_per_s": round(len(later) / sum(later), 4) if later else None,
            "peak_gib": round(max(peaks) / 2**30, 2) if peaks else None,
            "psnr_vs_stock_db": psnrs, "log_tail": done.stderr[-1200:]}


def psnr(first: Path, second: Path) -> float:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(first).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(second).convert("RGB"), dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def in_own_process(args, arm: str) -> dict:
    command = [sys.executable, __file__, "--one", arm, *sys.argv[1:]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.arm_seconds + 60)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.arm_seconds + 60} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": done.stderr[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(PIPELINES), default="flux")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-families"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--calls", type=int, default=2, help="calls timed after each arm's first")
    parser.add_argument("--arms", default="stock,eager,fp8", help="of stock, eager, compiled, fp8")
    parser.add_argument("--arm-seconds", type=float, default=300)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default="default")
    parser.add_argument("--scope", default="whole", choices=("whole", "regional"))
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models (to try the script on a CPU)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.folder = args.folder / args.family
    if args.one:
        print(json.dumps(stock(args) if args.one == "stock" else engine_arm(args, args.one)))
        return
    from engine.app import quiet_libraries

    quiet_libraries()
    import shutil

    import torch

    out = Path(os.environ.get("OUT", "."))
    result: dict = {"family": args.family, "size": args.size, "steps": args.steps, "guidance": GUIDANCE[args.family],
                    "mode": args.mode, "scope": args.scope, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "arms": {}}

    def save() -> None:
        (out / f"families_{args.family}.json").write_text(json.dumps(result, indent=1))

    shutil.rmtree(args.folder, ignore_errors=True)
    args.folder.mkdir(parents=True)
    started = time.perf_counter()
    (build_tiny if args.tiny else build)(args.family, args.folder / "model")
    result["build_s"] = round(time.perf_counter() - started, 1)
    save()
    for arm in args.arms.split(","):
        result["arms"][arm] = in_own_process(args, arm)
        print(arm, json.dumps({k: v for k, v in result["arms"][arm].items() if k != "log_tail"}), flush=True)
        save()
    base = result["arms"].get("stock", {}).get("images_per_s")
    for arm, figures in result["arms"].items():
        if base and figures.get("images_per_s"):
            figures["x_stock"] = round(figures["images_per_s"] / base, 3)
    save()
    print(json.dumps({arm: {k: v for k, v in f.items() if k not in ("log_tail", "compile_events")}
                      for arm, f in result["arms"].items()}, indent=1))


if __name__ == "__main__":
    main()
