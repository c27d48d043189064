"""result.json and summary.json, written by one hook after the commit of any write that ends a
session or batch, whoever made it (a runner's step, a control from any door, a control file).

The store calls `Results.after_commit(events)` after each commit. Writes the runner makes inside
`deferred()` have their files written by this object's own thread, in order, once the block ends
(after the block has published the steps' images: result.json comes last), so a worker's next
claim does not wait for them; any other write's files are written before the write returns. A write that
fails (a full or read-only disk) is owed and tried again by `retry()` on the runner's timer;
nothing committed is lost meanwhile, and recovery at the next start writes what is still missing.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.outbox.folders import Outbox
from engine.store import StoreError
from engine.ending import ENDED_BATCH, ENDED_SESSION

log = logging.getLogger("engine.outbox")


class Results:
    def __init__(self, outbox: Outbox, store) -> None:
        self.outbox, self.store = outbox, store
        self._local = threading.local()
        self._lock = threading.Lock()
        self._publishes: list[tuple[Path, Path, list[str]]] = []
        self._results: set[str] = set()
        self._summaries: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None

    # the hook ------------------------------------------------------------------------------

    def after_commit(self, events) -> None:
        """Write the files of what these committed events ended."""
        sessions = [e.stream_id for e in events if e.type in ENDED_SESSION]
        batches = [e.stream_id for e in events if e.type in ENDED_BATCH]
        if not (sessions or batches):
            return
        held = getattr(self._local, "held", None)
        if held is not None:
            held.append((sessions, batches))
        else:
            self._write_all(sessions, batches)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Writes committed in this block (on this thread) have their files written in the
        background once the block ends."""
        self._local.held = []
        try:
            yield
        finally:
            held, self._local.held = self._local.held, None
            for sessions, batches in held:
                self._background().submit(self._write_all, sessions, batches)

    def start_background(self) -> None:
        """Start the background thread now, not at the first session's end: a thread cannot be
        started once memory has run out, and the result.json of a step that ran out must be written."""
        self.caught_up()

    def caught_up(self) -> None:
        """Returns once everything handed to the background thread is written."""
        self._background().submit(lambda: None).result()

    def _background(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-results")
            return self._pool

    def _write_all(self, sessions: list[str], batches: list[str]) -> None:
        for session_id in sessions:  # a batch's summary reads its items' result.json
            self._write(lambda: self.outbox.write_result(self.store, session_id), self._results, session_id)
        for batch_id in batches:
            self._write(lambda: self.outbox.write_summary(self.store, batch_id), self._summaries, batch_id)

    # publishing a step's files -------------------------------------------------------------

    def publish(self, attempt_dir: Path | None, target_dir: Path, names: list[str]) -> None:
        """Rename a committed attempt's files into place; owed when the disk refuses."""
        try:
            self.outbox.publish(attempt_dir, target_dir, names)
        except OSError as exc:
            log.warning("could not publish %s into %s: %s; will try again", names, target_dir, exc)
            with self._lock:
                self._publishes.append((attempt_dir, target_dir, names))

    # what is owed --------------------------------------------------------------------------

    def _write(self, write, owed: set[str], key: str) -> None:
        try:
            write()
        except (OSError, StoreError) as exc:  # the disk's or the database's: owed, and tried again
            log.warning("could not write the outbox file of %s: %s; will try again", key,
                        exc.message if isinstance(exc, StoreError) else exc)
            with self._lock:
                owed.add(key)
        except Exception:  # a bug: said with its traceback; recovery writes the file at the next start
            log.exception("could not write the outbox file of %s; the next start of a runner writes it", key)
        else:
            with self._lock:
                owed.discard(key)

    def pending(self) -> bool:
        with self._lock:
            return bool(self._publishes or self._results or self._summaries)

    def retry(self) -> None:
        with self._lock:
            publishes, self._publishes = self._publishes, []
            results, summaries = sorted(self._results), sorted(self._summaries)
        for attempt_dir, target_dir, names in publishes:
            self.publish(attempt_dir, target_dir, names)
        self._write_all(results, summaries)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
