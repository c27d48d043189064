"""Saying that something is wrong without flooding the log: one line when trouble starts, a
summary every half minute while it lasts, one line when it ends (a store that cannot be written
once made 1.8 million log lines in 90 s)."""

from __future__ import annotations

import logging
import time
from typing import Callable


class Outage:
    """The log of one kind of trouble (the database, a scan), kept to a few lines however often it repeats."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.what, self.every, self.clock = logger, what, every, clock
        self.started: float | None = None
        self.count = 0
        self._said = 0.0
        self._last = ""

    def failed(self, error: BaseException, traceback: bool = True) -> None:
        """Another failure: logged the first time (with its traceback, unless the caller knows what it
        is: a database that cannot be reached), counted after that."""
        now = self.clock()
        self.count += 1
        self._last = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if self.started is None:
            self.started, self._said = now, now
            self.logger.error("%s failed: %s; going on, trying again (a summary every %g s until it works)",
                              self.what, self._last, self.every, exc_info=error if traceback else None)
        elif now - self._said >= self.every:
            self._said = now
            self.logger.error("%s still failing: %d failures in %.0f s, the last: %s", self.what, self.count,
                              now - self.started, self._last)

    def ok(self) -> None:
        """It worked: one line if it had been failing."""
        if self.started is not None:
            self.logger.warning("%s works again after %.0f s (%d failures)", self.what, self.clock() - self.started,
                                self.count)
        self.started, self.count = None, 0
