"""The starts of the compiled path and the float8 precision, through `engine run` as a user runs it
(each phase a new `engine run --until-idle` process on one installation, read back from its store):

    python bench/bench_fast_gpu.py                      # on a GPU: $OUT/fast_gpu.json
    python bench/bench_fast_gpu.py --tiny --size 64 --steps 2 --items 16 --backend eager   # the script, on a CPU

cold: no compile cache, calls of 1 and 8 compiled (--batch-sizes), the whole denoiser or its
repeated blocks (--scope). A single image (priority 90) and a batch of --items are queued; the
runner makes images eagerly while each call size compiles in another process (`engine warmup`),
and switches when it is done. Reported: the first call's end in seconds from the process's start, the
switch (seconds from the start, the compile's seconds, the eager calls meanwhile), images/s of the
eager and of the compiled calls (inside calls, and from the first such call's start to the last
one's end). The process is stopped after --cold-seconds. warm: a new process, caches present: a
single image (priority 90; compiled when 1 is among --batch-sizes), timed from the process's start,
and a batch of 24. fp8: a new process makes --fp8-items seeds with the fp16 model, then the same
seeds with the model registered `--precision fp8` (`[models] fp8_scaling` from --fp8-scaling),
each compiled as --scope says (--fp8-eager: the float8 model eagerly), calls of --call: each
precision's seconds a call and images/s over its compiled calls after its first (the one that
compiled), and each seed's PSNR of the float8 picture against the fp16 one, with the share of
pixels off by more than 8/255.
The model is SDXL's architecture with random weights (bench_gpu.build_sdxl), fp16.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import ensure_model  # noqa: E402

PROMPT = "a lighthouse at dusk"


class Installation:
    def __init__(self, root: Path, model: Path, args) -> None:
        from engine import app
        from engine.config import load_config

        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text(
            f'[models]\nfp8_scaling = "{args.fp8_scaling}"\n'
            f"[batching]\ncoalesce = true\nmax_batch_size = {args.call}\n"
            f'[compile]\nbatch_sizes = [{args.batch_sizes}]\nbackend = "{args.backend}"\nmode = "{args.mode}"\n'
            f'scope = "{args.scope}"\ncache = "{root / "compile-cache"}"\n'
            f'background = {str(args.background).lower()}\n')
        self.config_path = root / "config.toml"
        self.config = load_config(self.config_path)
        self.engine = app.Engine.create(self.config)
        self.store = self.engine.store
        models = self.engine.models
        if "sdxl" not in models.entries():
            models.add(model, "sdxl", compile_setting="on")
            models.add(model, "sdxl-fp8", compile_setting="off" if args.fp8_eager else "on", precision="fp8")

    def submit(self, job: dict) -> str:
        from engine import commands
        from engine.ingest.jobs import parse_job

        return commands.submit(self.store, self.engine.intake, parse_job(job), commands.Source("bench.json", "x")).target_id

    def query(self, sql: str, **params) -> list:
        from sqlalchemy import text

        with self.store.read() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]

    def run(self, seconds: float) -> dict:
        """`engine run --until-idle` in a process of its own, stopped (SIGINT) after `seconds`."""
        env = {**os.environ, "ENGINE_CONFIG": str(self.config_path)}
        started = time.time()
        process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], env=env,
                                   stderr=subprocess.PIPE, text=True)
        try:
            _, errors = process.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            errors = stopped(process)
        return {"started": started, "seconds": round(time.time() - started, 1), "returncode": process.returncode,
                "log_tail": errors[-1500:]}


def stopped(process: subprocess.Popen) -> str:
    """Stop an `engine run` as Ctrl-C does (killed if it has not stopped 30 s later); what it wrote to stderr."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[1]


def calls(install: Installation, since: float) -> list[dict]:
    """Each generation call finished since `since`: when (seconds after it), images, seconds inside, compiled."""
    from engine.store.events import epoch_of

    found = {}
    for output, finished in install.query("SELECT output, finished_at FROM steps WHERE step_type = "
                                          "'inference_generation' AND status = 'completed'"):
        data = json.loads(output)["data"]
        at = epoch_of(finished) - since
        if at >= 0:
            found[data["call_id"]] = {"at": round(at, 2), "images": data["call_images"], "inside": data["group_seconds"],
                                      "compiled": data["compiled"], "precision": data["precision"]}
    return sorted(found.values(), key=lambda c: c["at"])


def rates(made: list[dict], call: int) -> dict:
    """images/s of eager and of compiled calls: inside the calls, and over the wall clock."""
    figures = {}
    for compiled in (False, True):
        chosen = [c for c in made if c["compiled"] is compiled and c["images"] == call]
        if chosen:
            images, inside = sum(c["images"] for c in chosen), sum(c["inside"] for c in chosen)
            span = chosen[-1]["at"] - (chosen[0]["at"] - chosen[0]["inside"])
            figures["compiled" if compiled else "eager"] = {
                "calls": len(chosen), "images_per_s_inside": round(images / inside, 3),
                "images_per_s_wall": round(images / span, 3) if span > 0 else None}
    return figures


def switches(install: Installation, since: float) -> list[dict]:
    from engine.store.events import epoch_of

    found = []
    for kind, data, at in install.query("SELECT type, data, created_at FROM event_log WHERE type LIKE "
                                        "'model.compile%' ORDER BY event_id"):
        data, moment = json.loads(data), epoch_of(at) - since
        if moment >= 0:
            found.append({"event": kind, "at": round(moment, 1), "shape": data.get("shape"),
                          **{k: data[k] for k in ("seconds", "eager_calls", "first_call_seconds", "error") if k in data}})
    return found


def loads(install: Installation, since: float) -> list[dict]:
    """Each model load since `since`: when it ended, its seconds, by which runner."""
    from engine.store.events import epoch_of

    return [{"at": round(epoch_of(at) - since, 1), "seconds": json.loads(data).get("seconds"),
             "runner": json.loads(data).get("runner_id")}
            for data, at in install.query("SELECT data, created_at FROM event_log WHERE type = 'model.loaded' "
                                          "ORDER BY event_id") if epoch_of(at) >= since]


def first_image(install: Installation, session_id: str, since: float) -> float | None:
    from engine.store.events import epoch_of

    row = install.query("SELECT finished_at FROM sessions WHERE session_id = :s AND status = 'completed'", s=session_id)
    return round(epoch_of(row[0][0]) - since, 1) if row else None


def phase(install: Installation, args, name: str, items: int, seconds: float, seed0: int, single: bool) -> dict:
    params = {"model": "sdxl", "width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": 7.0}
    single = install.submit({"workflow": "txt2img", "priority": 90, "params": {**params, "prompt": "first",
                                                                                "seed": seed0 - 1}}) if single else None
    install.submit({"kind": "batch", "workflow": "txt2img", "params": {**params, "prompt": PROMPT},
                    "matrix": {"product": {"seed": list(range(seed0, seed0 + items))}},
                    "batch": {"preferred_batch_size": args.call, "max_batch_size": args.call}})
    ran = install.run(seconds)
    made = calls(install, ran["started"])
    return {"phase": name, "process": ran, "single_image_seconds_from_process_start": first_image(
        install, single, ran["started"]) if single else None,
        "first_call_done_seconds_from_process_start": made[0]["at"] if made else None,
        "compile_events": switches(install, ran["started"]), "model_loads": loads(install, ran["started"]),
        "rates": rates(made, args.call), "calls": made}


def latency_phase(install: Installation, args, count: int, seconds: float) -> dict:
    """Single images, one at a time, to a runner that has nothing else to do (a new `engine run`
    process, caches present): each image's seconds from its submit to its session's end, and its
    call's seconds inside the pipeline."""
    from engine.store.events import epoch_of

    env = {**os.environ, "ENGINE_CONFIG": str(install.config_path)}
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet"], env=env, stderr=subprocess.PIPE,
                               text=True)
    params = {"model": "sdxl", "width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": 7.0}
    images = []
    try:
        for number in range(count):
            submitted = time.time()
            session = install.submit({"workflow": "txt2img", "params": {**params, "prompt": "one at a time",
                                                                        "seed": 9000 + number}})
            while time.time() - started < seconds:
                row = install.query("SELECT status, created_at, finished_at FROM sessions WHERE session_id = :s",
                                    s=session)
                if row and row[0][0] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.02)
            else:
                break
            output = install.query("SELECT output FROM steps WHERE session_id = :s AND step_type = "
                                   "'inference_generation'", s=session)
            data = json.loads(output[0][0])["data"] if output and output[0][0] else {}
            images.append({"status": row[0][0], "submitted_at": round(submitted - started, 2),
                           "seconds": round(epoch_of(row[0][2]) - epoch_of(row[0][1]), 3) if row[0][2] else None,
                           "inside": data.get("group_seconds"), "compiled": data.get("compiled")})
    finally:
        errors = stopped(process)
    done = sorted(i["seconds"] for i in images[1:] if i["status"] == "completed" and i["seconds"])
    return {"phase": "latency", "images": images, "median_after_first": done[len(done) // 2] if done else None,
            "log_tail": errors[-1500:]}


def psnr_and_off(first: Path, second: Path) -> tuple[float, float]:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(first), dtype=np.float64)
    b = np.asarray(Image.open(second), dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return (float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse)),
            float((np.abs(a - b) > 8).mean()))


def fp8_phase(install: Installation, args, seeds: list[int], seconds: float) -> dict:
    """The same seeds in fp16, then in float8, in one new process: each precision's calls and rate,
    and each seed's PSNR (float8 against fp16)."""
    from engine import commands

    for (batch_id,) in install.query("SELECT batch_id FROM batches WHERE status NOT IN ('completed', 'failed', "
                                     "'cancelled')"):  # what the earlier phases left: not this phase's work
        commands.control(install.store, batch_id, "cancel")
    params = {"width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": 7.0, "prompt": "fp8 " + PROMPT}
    for model, priority in (("sdxl", 60), ("sdxl-fp8", 50)):  # fp16 first, then float8
        install.submit({"kind": "batch", "workflow": "txt2img", "priority": priority, "params": {**params, "model": model},
                        "matrix": {"product": {"seed": seeds}},
                        "batch": {"preferred_batch_size": args.call, "max_batch_size": args.call}})
    ran = install.run(seconds)
    made = calls(install, ran["started"])
    pictures = {}
    for result in install.config.outbox.glob("batches/*/item-*/result.json"):
        report = json.loads(result.read_text())
        p = report["params"]
        if report["status"] == "completed" and p.get("prompt") == params["prompt"]:
            pictures[(p["model"], p["seed"])] = result.parent / report["images"][0]
    pairs = []
    for seed in seeds:
        if ("sdxl", seed) in pictures and ("sdxl-fp8", seed) in pictures:
            value, off = psnr_and_off(pictures[("sdxl", seed)], pictures[("sdxl-fp8", seed)])
            pairs.append({"seed": seed, "psnr": round(value, 2), "share_off_by_more_than_8": round(off, 4)})
    per_precision = {}
    for precision in sorted({c["precision"] for c in made}):
        mine = [c for c in made if c["precision"] == precision and c["images"] == args.call]
        steady = [c for c in mine if c["compiled"]][1:] or mine[1:]  # after the call that compiled (or loaded)
        per_precision[precision] = {
            "calls": [round(c["inside"], 3) for c in mine], "compiled": [c["compiled"] for c in mine],
            "images_per_s_per_call": round(args.call * len(steady) / sum(c["inside"] for c in steady), 4) if steady else None}
    return {"phase": "fp8", "scaling": args.fp8_scaling, "process": ran, "calls": made, "rates": per_precision,
            "pairs": pairs, "psnr_median": sorted(p["psnr"] for p in pairs)[len(pairs) // 2] if pairs else None,
            "share_off_median": sorted(p["share_off_by_more_than_8"] for p in pairs)[len(pairs) // 2] if pairs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-fast-gpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--items", type=int, default=136, help="the cold phase's batch")
    parser.add_argument("--cold-seconds", type=float, default=250)
    parser.add_argument("--warm-seconds", type=float, default=100)
    parser.add_argument("--fp8-seconds", type=float, default=240)
    parser.add_argument("--fp8-items", type=int, default=32, help="the seeds made in each precision")
    parser.add_argument("--fp8-scaling", default="row", choices=("row", "tensor"))
    parser.add_argument("--fp8-eager", action="store_true", help="the float8 model eagerly (compile off)")
    parser.add_argument("--latency-images", type=int, default=6)
    parser.add_argument("--latency-seconds", type=float, default=90)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default="reduce-overhead")
    parser.add_argument("--phases", default="cold,warm,fp8")
    parser.add_argument("--scope", default="whole", choices=("whole", "regional"))
    parser.add_argument("--batch-sizes", default="1, 8", help="[compile] batch_sizes")
    parser.add_argument("--call", type=int, default=8, help="images a call (a batch's preferred and max size)")
    parser.add_argument("--foreground", dest="background", action="store_false",
                        help="[compile] background = false: the first call of a size waits for its compile")
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL instead (to try the script on a CPU)")
    args = parser.parse_args()
    import shutil

    started = time.perf_counter()
    model = ensure_model(args.folder, args.tiny)
    result: dict = {"model_seconds": round(time.perf_counter() - started, 1), "size": args.size, "steps": args.steps,
                    "mode": args.mode, "backend": args.backend, "scope": args.scope, "batch_sizes": args.batch_sizes,
                    "background": args.background}
    try:
        import torch

        result.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except Exception:
        pass
    shutil.rmtree(args.folder / "engine", ignore_errors=True)
    install = Installation(args.folder / "engine", model, args)
    out = Path(os.environ.get("OUT", args.folder))
    phases = args.phases.split(",")

    def save() -> None:
        (out / "fast_gpu.json").write_text(json.dumps(result, indent=1, default=str))

    if "cold" in phases:
        result["cold"] = phase(install, args, "cold", args.items, args.cold_seconds, 100, single=True)
        save()
    if "warm" in phases:
        result["warm"] = phase(install, args, "warm", 24, args.warm_seconds, 5000, single=True)
        save()
    if "latency" in phases:
        result["latency"] = latency_phase(install, args, args.latency_images, args.latency_seconds)
        save()
    if "fp8" in phases:
        result["fp8"] = fp8_phase(install, args, list(range(7000, 7000 + args.fp8_items)), args.fp8_seconds)
        save()
    brief = {name: {k: v for k, v in part.items() if k not in ("calls", "process", "log_tail")}
             for name, part in result.items() if isinstance(part, dict)}
    print(json.dumps(brief, indent=1, default=str))
    for name in ("cold", "warm", "fp8"):
        if name in result:
            print(name, "returncode", result[name]["process"]["returncode"], result[name]["process"]["log_tail"][-400:])
    if "latency" in result:
        print("latency", result["latency"]["log_tail"][-400:])


if __name__ == "__main__":
    main()
