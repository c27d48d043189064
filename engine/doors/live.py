"""What `engine run` and `engine session --follow` show while work goes on."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table
from engine import queries
from engine.app import Engine, require_installation
from engine.config import Config
from engine.run.runner import Runner

log = logging.getLogger("engine.run")


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


def _view(store) -> Table:
    rows, counts = queries.active_sessions(store), queries.counts(store)
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
    require_installation(config)
    engine = init_when_reachable(config, until_idle)  # an older installation is brought to the newest schema
    if engine is None:  # stopped while waiting for the database
        return 0
    store = engine.store
    runner = engine.runner(runner_id=runner_id)
    inbox = engine.inbox()
    inbox.scan()
    inbox.start()
    stopper = Stopper(runner, config.get("runner", "stop_timeout_seconds"))
    previous = {number: signal.signal(number, stopper.on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    done = threading.Event()
    viewer = None
    if live:
        def show() -> None:
            with Live(_view(store), console=console, refresh_per_second=4, transient=False) as screen:
                while not done.wait(0.5):
                    screen.update(_view(store))
                screen.update(_view(store))

        viewer = threading.Thread(target=show, daemon=True)
        viewer.start()
    try:
        return runner.run(until_idle=until_idle, before_idle_check=lambda: (inbox.scan(), inbox.idle())[1])
    finally:
        done.set()
        if viewer:
            viewer.join(timeout=2)
        inbox.stop()
        runner.close()
        engine.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
        if stopper.signalled:
            log.info("stopped (%s)", stopper.signalled)


def init_when_reachable(config: Config, until_idle: bool) -> Engine | None:
    """Engine.create(config), trying again with backoff while the database cannot be reached (said once, then
    summed up every half minute); with until_idle, StoreUnavailable after [database] reconnect_seconds."""
    from engine.outage import Outage
    from engine.store import STORE_ERRORS, StoreUnavailable, first_line, is_lost_connection

    outage, started, pause = Outage(log, "reaching the database"), time.monotonic(), 0.5
    stopped = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stopped.set()) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopped.is_set():
            try:
                engine = Engine.create(config)
                outage.ok()
                return engine
            except STORE_ERRORS as exc:
                if not (isinstance(exc, StoreUnavailable) or is_lost_connection(exc)):
                    raise
                if until_idle and time.monotonic() - started >= config.get("database", "reconnect_seconds"):
                    raise StoreUnavailable(f"cannot reach the database: {first_line(exc)}") from None
                outage.failed(exc, traceback=False)
                stopped.wait(pause)
                pause = min(pause * 2, 10.0)
        log.info("stopped while waiting for the database")
        return None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class Stopper:
    """What SIGINT (Ctrl-C) and SIGTERM (systemd, container runtimes) do to `engine run`. The first:
    say so at once, go on renewing leases, interrupt running steps at their next denoising step and
    hand them back with their attempts unused (a step that finishes first is recorded), then exit 0.
    A second signal, or `[runner] stop_timeout_seconds` after the first: take this runner's steps
    back now (recoveries, not failures) and exit at once, 130 after SIGINT, 143 after SIGTERM."""

    def __init__(self, runner: Runner, timeout: float) -> None:
        self.runner, self.timeout = runner, timeout
        self.signalled = ""
        self._lock = threading.Lock()

    def on_signal(self, number: int, _frame) -> None:
        name = signal.Signals(number).name
        if not self.signalled:
            self.signalled = name
            log.warning("%s: stopping; running steps are handed back at their next denoising step (their attempts "
                        "unused), within %g s; %s again stops at once", name, self.timeout,
                        "Ctrl-C" if number == signal.SIGINT else name)
            self.runner.interrupt()
            timer = threading.Timer(self.timeout, self._exit_now, (f"{self.timeout:g} s after {name}", 128 + number))
            timer.daemon = True
            timer.start()
            return
        # Not in the signal handler itself: the main thread may be inside a transaction.
        threading.Thread(target=self._exit_now, args=(f"a second {name}", 128 + number), daemon=True).start()

    def _exit_now(self, why: str, code: int) -> None:
        if not self._lock.acquire(blocking=False):
            return
        try:
            taken = self.runner.abandon()
            log.warning("stopping at once (%s): %d running step(s) handed back to the queue", why, taken)
        except Exception as exc:  # the database is gone too: their leases lapse as after a crash
            log.warning("stopping at once (%s); could not hand the running steps back (%s): their leases lapse",
                        why, exc)
        finally:
            logging.shutdown()
            os._exit(code)


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
            if current["status"] in ("completed", "failed", "cancelled"):
                return
            time.sleep(0.5)
