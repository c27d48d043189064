"""Two GPUs in one runner, in one run on one machine with two GPUs:

    python bench/bench_two_gpu.py                                   # SDXL (random weights), 1024x1024, 30 steps
    python bench/bench_two_gpu.py --tiny --devices cpu,cpu --steps 2 --size 64   # the script itself, on a CPU

1. one runner whose [runner] devices names the first GPU makes an --items batch; then a runner
   whose devices name both makes the same batch: images/s of each (wall time from submit to the
   batch's end) and their ratio;
2. in the two-GPU run: the model loads per worker (each GPU's worker loads it once, into its own
   warm cache), which worker claimed each generation step (both work, each on its own device);
3. `engine run` as its own process with both GPUs, a --kill-items batch dropped into its inbox as a
   job file; the process is killed with SIGKILL once a few items are done, and `engine run
   --until-idle` is started again: every item completed, its images published exactly once, every
   step completed once, and the store's own check passes.

The model is SDXL's architecture with random weights (bench_gpu.build_sdxl), fp16 on CUDA.
Prints a summary; writes $OUT/two_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import ensure_model  # noqa: E402

PROMPT = "a lighthouse at dusk"


class Installation:
    """A complete installation in a folder, as `engine init` makes it: config, store, intake."""

    def __init__(self, folder: Path, model: Path, devices: list[str], lease_seconds: float = 30.0) -> None:
        from engine import app
        from engine.config import load_config

        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.config_path = folder, folder / "config.toml"
        self.config_path.write_text(
            '[handlers]\nmodules = ["engine.domains"]\n[batching]\ncoalesce = true\nmax_batch_size = 8\n'
            f"[runner]\ndevices = {json.dumps(devices)}\nlease_seconds = {lease_seconds}\n")
        self.config = load_config(self.config_path)
        self.engine = app.Engine.create(self.config)
        self.store = self.engine.store
        self.intake = self.engine.intake
        self.engine.models.add(model, "sdxl-random")

    def env(self) -> dict[str, str]:
        root = str(Path(__file__).resolve().parents[1])
        return {**os.environ, "ENGINE_CONFIG": str(self.config_path),
                "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def batch_job(args, seeds: range) -> dict:
    return {"kind": "batch", "workflow": "txt2img",
            "params": {"model": "sdxl-random", "prompt": PROMPT, "width": args.size, "height": args.size,
                       "steps": args.steps, "guidance_scale": 7.0},
            "items": [{"seed": seed} for seed in seeds],
            "batch": {"preferred_batch_size": 8, "max_batch_size": 8}}


def query(install: Installation, sql: str, **params) -> list:
    from sqlalchemy import text

    with install.store.read() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def timed_batch(install: Installation, args, devices: list[str]) -> dict:
    """A runner with these devices: the model loaded on each (untimed), then the batch, timed."""
    from engine import commands
    from engine.ingest.jobs import parse_job

    runner = install.engine.runner()
    try:
        for n in range(len(devices)):  # one single image per worker first: loads and first calls not timed
            job = {"workflow": "txt2img", "params": {**batch_job(args, range(1))["params"], "seed": 9000 + n,
                                                     "device": devices[n]}}
            commands.submit(install.store, install.intake, parse_job(job), commands.Source(f"warm-{n}.json", "x"))
        runner.run(until_idle=True)
        started = time.perf_counter()
        commands.submit(install.store, install.intake, parse_job(batch_job(args, range(args.items))),
                        commands.Source("batch.json", "x"))
        runner.run(until_idle=True)
        seconds = time.perf_counter() - started
    finally:
        runner.close()
    claims = [json.loads(row[0]) for row in query(install, "SELECT data FROM events WHERE type = 'step.claimed'")]
    loads = Counter(row[0].split(":", 1)[1].rsplit(":", 1)[0] for row in query(  # <runner>:<worker>:<model>
        install, "SELECT stream_id FROM events WHERE type = 'model.loaded'"))
    done = query(install, "SELECT count(*) FROM sessions WHERE batch_id IS NOT NULL AND status = 'completed'")[0][0]
    return {"devices": devices, "items": args.items, "items_completed": done, "seconds": round(seconds, 3),
            "images_per_s": round(args.items / seconds, 4),
            "model_loads_per_worker": dict(loads),
            "generation_steps_per_worker": dict(Counter(c["worker"] for c in claims if c["step_index"] == 2)),
            "steps_on_their_workers_device": all(c["device"] == c["worker"].split("#")[0] for c in claims)}


def sigkill_run(install: Installation, args) -> dict:
    """`engine run` in its own process, killed with SIGKILL mid-batch, then run to the end."""
    from engine.outbox.folders import ATTEMPTS

    job = install.config.inbox / "kill-batch.json"
    job.with_suffix(".tmp").write_text(json.dumps(batch_job(args, range(100, 100 + args.kill_items))))
    job.with_suffix(".tmp").rename(job)

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "engine", "run", "--quiet", *extra], env=install.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=install.folder)

    first = start()
    deadline, killed_at = time.monotonic() + args.kill_timeout, None
    while time.monotonic() < deadline and first.poll() is None:
        done = query(install, "SELECT count(*) FROM sessions WHERE batch_id IS NOT NULL AND status = 'completed'")
        if done and done[0][0] >= args.kill_after:
            killed_at = done[0][0]
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    output = first.communicate()[0].decode()[-2000:]
    started = time.perf_counter()
    second = start("--until-idle")
    rest = second.communicate(timeout=args.kill_timeout)[0].decode()[-2000:]
    sessions = [row[0] for row in query(install, "SELECT session_id FROM sessions WHERE batch_id IS NOT NULL")]
    statuses = Counter(row[0] for row in query(install, "SELECT status FROM sessions WHERE batch_id IS NOT NULL"))
    completions = Counter((d["session_id"], d["step_index"]) for d in (json.loads(row[0]) for row in query(
        install, "SELECT data FROM events WHERE type = 'step.completed'")))
    outbox = install.config.outbox
    images = [p for p in outbox.rglob("*.png") if ATTEMPTS not in p.parts and p.name != "contact-sheet.png"]
    return {"items": args.kill_items, "completed_when_killed": killed_at, "restart_seconds": round(time.perf_counter() - started, 1),
            "restart_exit": second.returncode, "sessions": len(sessions), "statuses": dict(statuses),
            "steps_completed_once": bool(completions) and set(completions.values()) == {1},
            "images_published": len(images), "distinct_image_names": len({p.relative_to(outbox) for p in images}),
            "verify": install.store.verify(), "killed_output_tail": output[-400:], "restart_output_tail": rest[-400:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-two-gpu"))
    parser.add_argument("--devices", default="cuda:0,cuda:1")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--kill-items", type=int, default=32)
    parser.add_argument("--kill-after", type=int, default=8, help="SIGKILL once this many items are done")
    parser.add_argument("--kill-timeout", type=float, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL instead (to try the script on a CPU)")
    args = parser.parse_args()
    from engine.app import quiet_libraries

    quiet_libraries()
    import shutil

    model = ensure_model(args.folder, args.tiny)
    devices = args.devices.split(",")
    result: dict = {"steps": args.steps, "size": args.size}
    out = Path(os.environ["OUT"]) / "two_gpu.json" if os.environ.get("OUT") else None
    for name, chosen in (("one_gpu", devices[:1]), ("two_gpus", devices)):
        shutil.rmtree(args.folder / name, ignore_errors=True)
        install = Installation(args.folder / name, model, chosen)
        result[name] = timed_batch(install, args, chosen)
        install.store.close()
        print(json.dumps({name: result[name]}), flush=True)
        out and out.write_text(json.dumps(result, indent=2))
    result["ratio_two_to_one"] = round(result["two_gpus"]["images_per_s"] / result["one_gpu"]["images_per_s"], 3)
    shutil.rmtree(args.folder / "sigkill", ignore_errors=True)
    install = Installation(args.folder / "sigkill", model, devices, lease_seconds=10.0)
    result["sigkill"] = sigkill_run(install, args)
    import torch

    if torch.cuda.is_available():
        result["gpus"] = [torch.cuda.get_device_name(n) for n in range(torch.cuda.device_count())]
        result["torch"] = torch.__version__
    print(json.dumps({k: v for k, v in result.items() if k not in ("one_gpu", "two_gpus")}, indent=1), flush=True)
    out and out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
