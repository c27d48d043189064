"""What `engine run` and `engine session --follow` show while work goes on."""

from __future__ import annotations

import json
import threading
import time
from typing import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table
from engine.face import reads, words
from engine.config import Config
from engine.host import Host


def step_label(status: str, current_step: int, total_steps: int) -> str:
    """The step a session is at, counted from 1, the same in every view ("3/4"; "0/4" before it starts)."""
    if status == "completed":
        return f"{total_steps}/{total_steps}"
    return f"{current_step + (status != 'pending')}/{total_steps}"


def prompt_start(params: dict | str | None, width: int = 32) -> str:
    """The start of a session's prompt, for a one-line view."""
    if isinstance(params, str):
        params = json.loads(params)
    prompt = (params or {}).get("prompt") or ""
    return prompt if len(prompt) <= width else prompt[: width - 1] + "…"


def _view(engine) -> Table:
    rows, counts = reads.active_sessions(engine), reads.counts(engine)
    table = Table(title="sessions: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no sessions")
    for column in ("session", "job", "workflow", "prompt", "status", "step", "progress"):
        table.add_column(column)
    for row in rows:
        bar = "#" * int(row["progress"] * 20)
        step = f"{step_label(row['status'], row['current_step'], row['total_steps'])} {row['step_type'] or ''}"
        shown = "waiting for a runner" if row["waiting"] else row["status"]
        table.add_row(row["session_id"], row["job_id"] or "", row["workflow_id"], prompt_start(row["params"]), shown,
                      step, f"{bar:<20} {row['progress']:4.0%} {row['message'] or ''}")
    return table


def run_with_view(config: Config, until_idle: bool, console: Console, live: bool, runner_id: str | None = None) -> int:
    host = Host(config, until_idle=until_idle, runner_id=runner_id)
    if not host.open():  # stopped while waiting for the database
        return 0
    engine = host.engine
    done = threading.Event()
    viewer = None
    if live:
        def show() -> None:
            with Live(_view(engine), console=console, refresh_per_second=4, transient=False) as screen:
                while not done.wait(0.5):
                    screen.update(_view(engine))
                screen.update(_view(engine))

        viewer = threading.Thread(target=show, daemon=True)
        viewer.start()
    try:
        return host.run_here()
    finally:
        done.set()
        if viewer:
            viewer.join(timeout=2)
        host.close()


def follow_session(config: Config, session_id: str, console: Console, report: Callable[[], dict]) -> None:
    """Redraw one session's progress until it ends."""
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console) as progress:
        task = progress.add_task(session_id, total=1.0)
        while True:
            current = report()
            step = current["steps"][min(current["current_step"], len(current["steps"]) - 1)] if current["steps"] else {}
            progress.update(task, completed=current["progress"],
                            description=f"{current['session_id']} {current['status']} {step.get('step_type', '')}")
            if current["status"] in words.TERMINAL:
                return
            time.sleep(0.5)
