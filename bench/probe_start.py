"""Where a new `engine run` process's time goes before its first image, on this machine: a tiny
SDXL-architecture model (its weights cost nothing, so what is left is the process's own start),
one txt2img job, `engine run --until-idle` under `python -X importtime`, timed from its start:

    python bench/probe_start.py [--runs 2] [--folder /tmp/engine-start]   # $OUT/start.json too

Reported per run: each event's moment in seconds after the process started (the session's
creation, each step's start and end, model.loaded with its own seconds), the process's whole
time, and the imports' time by top-level package (importtime's own account, which adds a little
to what it measures). Runs after the first find the interpreter's bytecode caches written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def imports_by_package(importtime: str) -> dict[str, float]:
    """Seconds of import by top-level package, from `-X importtime`'s lines (each module's own time)."""
    totals: Counter = Counter()
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line.removeprefix("import time:").split("|")
        totals[name.strip().split(".")[0]] += int(own) / 1e6
    return {name: round(seconds, 2) for name, seconds in totals.most_common(12)}


def timeline(config: Path, since: float) -> list[dict]:
    """The store's events after `since`, in order: their type, step and moment."""
    from sqlalchemy import text

    from engine import app
    from engine.config import load_config
    from engine.store.events import epoch_of

    engine = app.Engine.create(load_config(config))
    with engine.store.read() as conn:
        rows = conn.execute(text("SELECT type, data, created_at FROM event_log ORDER BY event_id")).all()
    moments = []
    for kind, data, at in rows:
        if epoch_of(at) < since:
            continue
        data = json.loads(data) if data else {}
        moments.append({"at": round(epoch_of(at) - since, 2), "event": kind,
                        **{k: data[k] for k in ("step_type", "seconds") if k in data}})
    return moments


def one_run(root: Path, device: str) -> dict:
    from engine import commands
    from engine.app import Engine
    from engine.config import load_config
    from engine.ingest.jobs import parse_job

    engine = Engine.create(load_config(root / "config.toml"))
    commands.submit(engine.store, engine.intake, parse_job({"workflow": "txt2img", "params": {
        "model": "tiny", "prompt": "a start", "width": 64, "height": 64, "steps": 2}}), commands.Source("probe.json", "x"))
    env = {**os.environ, "ENGINE_CONFIG": str(root / "config.toml"), "PYTHONUNBUFFERED": "1"}
    started = time.time()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "engine", "run", "--until-idle", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    seconds = time.time() - started
    return {"device": device, "process_seconds": round(seconds, 2), "returncode": done.returncode,
            "events": timeline(root / "config.toml", started), "imports_s": imports_by_package(done.stderr),
            "errors": [line for line in done.stderr.splitlines() if not line.startswith("import time:")][-5:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-start"))
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    import shutil

    import torch

    from engine.app import Engine
    from engine.config import load_config
    from engine.domains.tinymodels import build_tiny_sdxl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shutil.rmtree(args.folder, ignore_errors=True)
    root = args.folder / "engine"
    root.mkdir(parents=True)
    (root / "config.toml").write_text(f'[device]\npreferred = "{device}"\n')
    build_tiny_sdxl(args.folder / "tiny")
    Engine.create(load_config(root / "config.toml")).models.add(args.folder / "tiny", "tiny")
    runs = [one_run(root, device) for _ in range(args.runs)]
    print(json.dumps(runs, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "start.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
