"""`engine demo`: a complete installation in ./demo, run end to end on a tiny model.

The model is built in code with RANDOM WEIGHTS: it runs the real loading and generation code, and
the pictures it draws are noise. Sample jobs for txt2img, img2img, inpaint, a batch, an upscale and
a cancel are dropped into the inbox; the engine runs until idle; the SQL status table, the outbox
paths and a contact sheet of every image are shown.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console

from engine.app import Engine, quiet_libraries
from engine.config import DEFAULTS_FILE, load_config
from engine.face import operate

SIZE = 64
COMMON = {"model": "tiny-sdxl", "width": SIZE, "height": SIZE, "steps": 6, "guidance_scale": 5.0}


def sample_jobs() -> dict[str, dict]:
    return {
        "01-txt2img.json": {"jobId": "demo-txt2img", "workflow": "txt2img",
                            "params": {**COMMON, "prompt": "a lighthouse at dusk", "seed": 42, "scheduler": "euler",
                                       "numImages": 2}},
        "02-img2img.json": {"jobId": "demo-img2img", "workflow": "img2img",
                            "params": {**COMMON, "prompt": "a stormy sea", "seed": 7, "initImage": "images/start.png",
                                       "strength": 0.6, "scheduler": "dpm++2m_karras"}},
        "03-inpaint.json": {"job_id": "demo-inpaint", "workflow": "inpaint",
                            "params": {**COMMON, "prompt": "a red door", "seed": 3, "init_image": "images/start.png",
                                       "mask_image": "images/mask.png", "strength": 0.9, "scheduler": "ddim"}},
        "04-batch.json": {"kind": "batch", "job_id": "demo-batch", "workflow": "txt2img",
                          "params": {**COMMON, "seed": 100, "scheduler": "euler_a"},
                          "items": [{"prompt": "a red fox"}, {"prompt": "a blue whale"}, {"prompt": "a green owl"}]},
        "05-upscale.json": {"JobId": "demo-upscale", "Workflow": "upscale",
                            "Params": {"InitImage": "images/start.png",
                                       "Postprocess": [{"Op": "upscale", "Model": "tiny-upscaler", "Scale": 2},
                                                       {"Op": "enhance", "Preset": "vivid"}]}},
        "06-hires.json": {"job_id": "demo-hires", "workflow": "txt2img-hires",
                          "params": {**COMMON, "prompt": "a castle on a hill", "seed": 5}},
        "07-held.json": {"job_id": "demo-cancel-me", "workflow": "txt2img", "hold": True,
                         "params": {**COMMON, "prompt": "never drawn", "seed": 1}},
        "08-cancel.json": {"kind": "control", "target": "demo-cancel-me", "action": "cancel"},
    }


def _sample_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    start = Image.new("RGB", (SIZE, SIZE), (30, 60, 120))
    draw = ImageDraw.Draw(start)
    draw.rectangle((16, 24, 48, 56), fill=(220, 200, 80))
    start.save(folder / "start.png")
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).ellipse((20, 20, 44, 44), fill=255)
    mask.save(folder / "mask.png")


def run_demo(folder: Path, console: Console) -> None:
    quiet_libraries()
    started = time.perf_counter()
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.toml"
    if not config_path.exists():
        config_path.write_text(DEFAULTS_FILE.read_text())
    config = load_config(config_path)
    Engine.create(config).close()
    console.print(f"[bold]engine demo[/] in {folder}")
    console.print("[yellow]The demo model has RANDOM WEIGHTS, built in code: its images are noise.[/]")
    operate.build_demo_models(config, console.print)
    _sample_images(config.inbox / "images")
    run_tag = time.strftime("%H%M%S")
    for name, job in sample_jobs().items():
        for key in ("jobId", "job_id", "JobId"):
            if key in job:
                job[key] = f"{job[key]}-{run_tag}"
        if job.get("kind") == "control":
            job["target"] = f"{job['target']}-{run_tag}"
        tmp = config.inbox / f".{name}.tmp"
        tmp.write_text(json.dumps(job, indent=2))
        tmp.rename(config.inbox / name)  # write, then rename: what every client should do
    console.print(f"dropped {len(sample_jobs())} job files into {config.inbox}")

    from engine.doors.live import run_with_view

    done = run_with_view(config, until_idle=True, console=console, live=console.is_terminal)
    console.print(f"{done} steps done in {time.perf_counter() - started:.1f}s")

    columns, rows = operate.sql(config, "SELECT session_id, job_id, workflow_id, status, current_step, total_steps, "
                                    "error_code FROM session_status ORDER BY created_at")
    from rich.table import Table

    table = Table(title="SELECT ... FROM session_status")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    console.print(table)
    _, batch_rows = operate.sql(config, "SELECT batch_id, status, completed_items, total_items FROM batch_status")
    for row in batch_rows:
        console.print(f"batch {row[0]}: {row[1]}, {row[2]}/{row[3]} items")
    results = sorted(config.outbox.rglob("result.json"))
    images = []
    for result_path in results:
        result = json.loads(result_path.read_text())
        label = f"#{result['item_index']}" if result["item_index"] is not None else result["session_id"][4:12]
        images += [(result_path.parent / name, f"{label} {operate.seed_label(name)}") for name in result["images"]]
    console.print(f"outbox: {config.outbox} ({len(results)} result.json, {len(images)} final images)")
    for result_path in results[-12:]:
        console.print(f"  {result_path.parent.relative_to(folder)}", highlight=False)
    sheet = operate.contact_sheet(images, config.outbox / "contact-sheet.png", thumb=96, columns=6)
    if sheet:
        console.print(f"contact sheet: {sheet}")
    console.print(f"try: engine --config {config_path} sql \"select status, count(*) from session_status group by 1\"",
                  highlight=False)
    server = config.get("server", "host"), config.get("server", "port")
    console.print(f"see it in a browser: engine --config {config_path} serve (the server extra: pip install -e "
                  f"\".[server]\"), then open http://{server[0]}:{server[1]}/ (the queue, each session, the gallery, "
                  "a submit form)", highlight=False)
