"""Saying that something is wrong without flooding the log: one line when trouble starts, a
summary every half minute while it lasts, one line when it has ended (a store that cannot be
written once made 1.8 million log lines in 90 s).

Trouble has ended when nothing failed for `quiet` seconds: a database whose connections are killed
every 0.3 s is one outage, not hundreds that each start and end.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable


class Outage:
    """The log of one kind of trouble (the database, a scan), kept to a few lines however often it
    repeats; safe to share between threads."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 30.0, quiet: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.what, self.every, self.quiet, self.clock = logger, what, every, quiet, clock
        self.started: float | None = None
        self.count = 0
        self._said = self._last_failure = 0.0
        self._last = ""
        self._lock = threading.Lock()

    def failed(self, error: BaseException, traceback: bool = True) -> None:
        """Another failure: logged the first time (with its traceback, unless the caller knows what it
        is: a database that cannot be reached), counted after that."""
        with self._lock:
            now = self.clock()
            self.count += 1
            self._last_failure = now
            text = str(error).strip().splitlines()
            self._last = f"{type(error).__name__}: {text[0] if text else ''}"
            if self.started is None:
                self.started, self._said = now, now
                self.logger.error("%s failed: %s; going on, trying again (a summary every %g s until it works)",
                                  self.what, self._last, self.every, exc_info=error if traceback else None)
            elif now - self._said >= self.every:
                self._said = now
                self.logger.error("%s still failing: %d failures in %.0f s, the last: %s", self.what, self.count,
                                  now - self.started, self._last)

    def ok(self) -> None:
        """It worked: one line once nothing has failed for `quiet` seconds."""
        with self._lock:
            if self.started is None or self.clock() - self._last_failure < self.quiet:
                return
            self.logger.warning("%s works again: %d failures over %.0f s", self.what, self.count,
                                self._last_failure - self.started)
            self.started, self.count = None, 0
