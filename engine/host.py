"""The one way a long-running command is hosted: `engine run`, `engine serve` and `engine worker
--stdio` all start, stop and take signals through `Host`.

A host opens the installation (waiting, with backoff, while the database cannot be reached),
builds the runner and the inbox it was asked for, and stops as every one of those commands
stops: SIGINT or SIGTERM says so at once, interrupts running steps at their next denoising step
and hands them back with their attempts unused (a step that finishes first is recorded); a second
signal, or `[runner] stop_timeout_seconds` after the first, takes this runner's steps back now
and exits at once (130 after SIGINT, 143 after SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from engine.app import Engine, require_installation
from engine.config import Config

log = logging.getLogger("engine.run")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_handled(handler: Callable) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` inside the block; what was there before comes back after."""
    previous = {number: signal.signal(number, handler) for number in SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def init_when_reachable(config: Config, until_idle: bool) -> Engine | None:
    """Engine.create(config), trying again with backoff while the database cannot be reached (said once, then
    summed up every half minute); with until_idle, StoreUnavailable after [database] reconnect_seconds.
    None when a signal came meanwhile."""
    from engine.outage import Outage
    from engine.store import STORE_ERRORS, StoreUnavailable, first_line, is_lost_connection

    outage, started, pause = Outage(log, "reaching the database"), time.monotonic(), 0.5
    stopped = threading.Event()
    with signals_handled(lambda *_: stopped.set()):
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


class Stopper:
    """What SIGINT (Ctrl-C) and SIGTERM (systemd, container runtimes) do to a hosted runner (see the
    module's docstring). `runner` None: a process without one, which stops at the first signal."""

    def __init__(self, runner, timeout: float) -> None:
        self.runner, self.timeout = runner, timeout
        self.signalled = ""
        self.first = threading.Event()
        self._lock = threading.Lock()

    def on_signal(self, number: int, _frame) -> None:
        name = signal.Signals(number).name
        if not self.signalled:
            self.signalled = name
            self.first.set()
            if self.runner is None:
                log.warning("%s: stopping", name)
                return
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
            taken = self.runner.abandon() if self.runner is not None else 0
            log.warning("stopping at once (%s): %d running step(s) handed back to the queue", why, taken)
        except Exception as exc:  # noqa: BLE001 - the last words before os._exit: whatever failed, the leases lapse
            log.warning("stopping at once (%s); could not hand the running steps back (%s): their leases lapse",
                        why, exc)
        finally:
            logging.shutdown()
            os._exit(code)


class Host:
    """One hosted process: its Engine, its runner (unless `with_runner` is off) and its inbox
    (with the runner, unless `with_inbox` is off), and the Stopper its signals go to.

    Use: `open()` (False: a signal came while the database could not be reached), then either
    `run_here()` (the runner in this thread: `engine run`) or `start_background()` and the door's
    own loop, then `close()`."""

    def __init__(self, config: Config, *, with_runner: bool = True, with_inbox: bool = True, until_idle: bool = False,
                 runner_id: str | None = None) -> None:
        self.config, self.with_runner, self.until_idle, self.runner_id = config, with_runner, until_idle, runner_id
        self.with_inbox = with_inbox
        self.engine: Engine | None = None
        self.runner = None
        self.inbox = None
        self.stopper: Stopper | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> bool:
        require_installation(self.config)
        self.engine = init_when_reachable(self.config, self.until_idle)  # an older installation is upgraded
        if self.engine is None:
            return False
        if self.with_runner:
            self.runner = self.engine.runner(runner_id=self.runner_id)
            self.inbox = self.engine.inbox() if self.with_inbox else None
        self.stopper = Stopper(self.runner, self.config.get("runner", "stop_timeout_seconds"))
        return True

    @property
    def stopping(self) -> threading.Event:
        """Set at the first signal."""
        return self.stopper.first

    def start_inbox(self) -> None:
        if self.inbox is not None:
            self.inbox.scan()
            self.inbox.start()

    def run_here(self) -> int:
        """The inbox and the runner, the runner's loop in this thread, signals handled; the steps done."""
        self.start_inbox()
        with signals_handled(self.stopper.on_signal):
            return self.runner.run(until_idle=self.until_idle,
                                   before_idle_check=lambda: (self.inbox.scan(), self.inbox.idle())[1])

    def start_background(self) -> None:
        """The inbox and the runner's loop in a thread of its own (the door keeps this thread)."""
        self.start_inbox()
        if self.runner is not None:
            self._thread = threading.Thread(target=self.runner.run, name="engine-runner", daemon=True)
            self._thread.start()

    def runner_live(self) -> bool:
        """Whether this process's runner is at work (True where it has none: the runner is elsewhere)."""
        return self._thread is None or self._thread.is_alive()

    def wait(self, door: threading.Thread) -> None:
        """Until the door's thread ends (its client went away) or a signal comes, signals handled."""
        with signals_handled(self.stopper.on_signal):
            while door.is_alive() and not self.stopping.is_set():
                door.join(0.2)

    def close(self) -> None:
        """Stop: after a signal the running steps are handed back (interrupted); otherwise the runner
        stops once its running steps are recorded. Then the runner and the Engine are closed. A
        signal meanwhile goes to the Stopper (a second one stops at once)."""
        with signals_handled(self.stopper.on_signal if self.stopper else signal.default_int_handler):
            try:
                if self.inbox is not None:
                    self.inbox.stop()
                if self.runner is not None:
                    if self.stopper.signalled:
                        self.runner.interrupt()
                    else:
                        self.runner.stop()
                    if self._thread is not None:
                        self._thread.join(timeout=self.config.get("runner", "stop_timeout_seconds"))
                    self.runner.close()
            finally:
                if self.engine is not None:
                    self.engine.close()
                if self.stopper is not None and self.stopper.signalled:
                    log.info("stopped (%s)", self.stopper.signalled)
