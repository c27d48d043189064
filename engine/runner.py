"""The runner: claim a step under a lease, run its handler in a worker thread, record the result.

The handler runs in one worker thread (one per device); this thread renews the lease, watches
for pause and cancel (setting the handler's cancellation token), and writes throttled progress.
A step's completion and the claim of the next step commit in one transaction; the step's files
are renamed into the outbox right after that commit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from sqlalchemy import select

from engine import lifecycle
from engine.errors import Cancelled, EngineError, StaleLease
from engine.handlers import CancellationToken, Registry, StepContext, StepResult
from engine.lifecycle import Claim, Policy
from engine.outbox import Outbox
from engine.recovery import recover
from engine.store import Store, Tx
from engine.store.tables import leases, sessions

log = logging.getLogger("engine.runner")


def default_runner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Runner:
    def __init__(self, config, store: Store, registry: Registry, runner_id: str | None = None,
                 on_step: Callable[[Claim, str], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.runner_id = runner_id or default_runner_id()
        self.policy = Policy.from_config(config)
        self.outbox = Outbox(config.outbox)
        runner = config.values["runner"]
        self.heartbeat_every = runner["heartbeat_seconds"]
        self.control_every = runner["control_poll_seconds"]
        self.idle_sleep = runner["idle_poll_seconds"]
        self.progress_every = 1.0 / max(runner["progress_writes_per_second"], 0.01)
        self.worker = _Worker()
        # result.json and summary.json are written off the claim loop, in order; a crash before
        # they are written is mended by recovery (ended sessions without result.json get one).
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-finisher")
        # Its thread is started now, not at the first session's end: a thread cannot be started
        # when memory has run out, and the result.json of a step that ran out must still be written.
        self._finisher_caught_up()
        self.stop_event = threading.Event()
        self.on_step = on_step or (lambda claim, outcome: None)
        self.steps_done = 0

    # the loop ------------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        return recover(self.store, self.outbox, self.policy, self.runner_id)

    def run(self, until_idle: bool = False, before_idle_check: Callable[[], bool] | None = None) -> int:
        """Run steps until stopped (or, with until_idle, until nothing is left to do)."""
        self.recover()
        claim: Claim | None = None
        last_reap = time.monotonic()
        while not self.stop_event.is_set():
            if claim is None:
                claim = lifecycle.claim(self.store, self.runner_id, self.policy)
            if claim is not None:
                claim = self.execute(claim)
                continue
            if time.monotonic() - last_reap > self.policy.lease_seconds / 2:
                lifecycle.reap_expired(self.store, self.policy)
                last_reap = time.monotonic()
            if until_idle and (before_idle_check is None or before_idle_check()) and self.nothing_left():
                self._finisher_caught_up()  # every result.json is written before we say idle
                break
            self.stop_event.wait(self.idle_sleep)
        return self.steps_done

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.worker.close()
        self.finisher.shutdown(wait=True)

    def _finisher_caught_up(self) -> None:
        """Returns once everything handed to the finisher is written (it runs in order)."""
        self.finisher.submit(lambda: None).result()

    def _finish(self, events, rows: dict | None = None) -> None:
        if any(e.type.startswith(("session.", "batch.")) for e in events):
            self.finisher.submit(self.outbox.finish, self.store, events, rows)

    def nothing_left(self) -> bool:
        """No step is running anywhere (each holds a lease) and none is waiting to run, a retry's
        backoff included (paused sessions wait for a user, not for us)."""
        with self.store.read() as conn:
            waiting = conn.execute(select(sessions.c.session_id).where(sessions.c.ready == 1).limit(1)).first()
            running = conn.execute(select(leases.c.session_id).limit(1)).first()
        return waiting is None and running is None

    # one step ------------------------------------------------------------------------------

    def execute(self, claim: Claim) -> Claim | None:
        """Run one claimed step to its recorded end; returns the next claim, if one was taken."""
        attempt_dir = self.outbox.attempt_dir(claim.session_id, claim.run, claim.step_index, claim.attempt)
        token = CancellationToken()
        progress = _Progress()
        notices: list[tuple[str, dict[str, Any]]] = []
        context = StepContext(
            session_id=claim.session_id, run=claim.run, step_index=claim.step_index, step_type=claim.step_type,
            domain=claim.domain, attempt=claim.attempt, params=claim.params, step_config=claim.step_config,
            previous=self._previous_outputs(claim), attempt_dir=attempt_dir, inbox=self.config.inbox, token=token,
            progress=progress.set, config=self.config, shared=self.registry.shared,
            notify=lambda kind, data: notices.append((kind, data)),
        )
        def written():  # the attempt's folder, or None when the handler wrote nothing
            return attempt_dir if context.work_dir_made else None

        started = time.monotonic()
        try:
            try:
                handler = self.registry.get(claim.step_type)
                self.worker.start(handler, context)
                result = self._wait(claim, token, progress)
            finally:
                self._record_notices(notices)  # models loaded on the way are recorded whatever the outcome
        except Cancelled:
            return self._interrupted(claim, token, written())
        except EngineError as exc:
            return self._failed(claim, exc.code, exc.message, exc.retryable, written())
        except Exception as exc:  # a handler's own bug or a library error: the step failed
            log.exception("step %s of %s failed", claim.step_index, claim.session_id)
            return self._failed(claim, "STEP_FAILED", f"{type(exc).__name__}: {exc}", True, written())
        return self._completed(claim, result, time.monotonic() - started, written())

    def _wait(self, claim: Claim, token: CancellationToken, progress: "_Progress") -> StepResult:
        """Wait for the handler, renewing the lease and passing pause and cancel on to it."""
        last_beat = time.monotonic()
        while True:
            try:
                return self.worker.result(timeout=self.control_every)
            except queue.Empty:
                pass
            now = time.monotonic()
            value = progress.take_if_due(self.progress_every)
            if value is not None or now - last_beat >= self.heartbeat_every:
                owned, status = lifecycle.heartbeat(self.store, claim, self.policy, *(value or (None, None)))
                last_beat = now
                if not owned:
                    token.set("lease lost")
            else:
                status = lifecycle.session_status(self.store, claim.session_id)
            if status in (None, "cancelled", "deleted"):
                token.set("cancelled")
            elif status == "paused":
                token.set("paused")

    def _previous_outputs(self, claim: Claim) -> list[dict[str, Any]]:
        """Earlier steps' outputs with absolute paths: in the outbox, or (another runner is just
        renaming them) still in their committed attempt folder."""
        session = claim.session_ref
        outputs = []
        for index, attempt, output in claim.previous:
            if not (output.get("images") or output.get("files")):
                outputs.append({"images": [], "files": [], "data": output.get("data", {})})
                continue
            resolved = self.outbox.published(session, output)
            pending = self.outbox.attempt_dir(claim.session_id, claim.run, index, attempt)
            for key in ("images", "files"):
                resolved[key] = [p if os.path.exists(p) or not (pending / os.path.basename(p)).exists()
                                 else str(pending / os.path.basename(p)) for p in resolved[key]]
            outputs.append(resolved)
        return outputs

    # recording outcomes --------------------------------------------------------------------

    def _completed(self, claim: Claim, result: StepResult, duration: float, work_dir) -> Claim | None:
        output = {"images": list(result.images), "files": list(result.files), "data": result.data}

        ended: dict[str, tuple] = {}

        def record(tx: Tx) -> Claim | None:
            ended.clear()  # a retried transaction starts over
            if lifecycle.complete_in(tx, claim, output, duration):
                ended[claim.session_id] = (tx.get("sessions", (claim.session_id,)),
                                           tx.projection.children("steps", claim.session_id))
            if self.stop_event.is_set():
                return None
            return lifecycle.claim_in(tx, self.runner_id, self.policy)

        try:
            next_claim, events = self.store.write_events(record)
        except StaleLease:
            self.outbox.discard(work_dir)
            self.on_step(claim, "stale")
            return None
        self.outbox.publish(work_dir, self.outbox.dir_of(claim.session_ref), output["images"] + output["files"])
        self._finish(events, ended)
        self.steps_done += 1
        self.on_step(claim, "completed")
        return next_claim

    def _failed(self, claim: Claim, code: str, message: str, retryable: bool, work_dir) -> None:
        self.outbox.discard(work_dir)
        try:
            _, events = self.store.write_events(
                lambda tx: lifecycle.fail_in(tx, claim, code, message, retryable, self.policy))
        except StaleLease:
            self.on_step(claim, "stale")
            return None
        self._finish(events)
        self.on_step(claim, "failed")
        return None

    def _interrupted(self, claim: Claim, token: CancellationToken, work_dir) -> None:
        self.outbox.discard(work_dir)
        if token.reason == "paused":
            try:
                self.store.write(lambda tx: lifecycle.release_in(tx, claim, "paused"))
            except StaleLease:
                pass
        self.on_step(claim, token.reason or "interrupted")
        return None

    def _record_notices(self, notices: list[tuple[str, dict[str, Any]]]) -> None:
        if not notices:
            return

        def record(tx: Tx) -> None:
            for kind, data in notices:
                key = f"{self.runner_id}:{data['model_id']}"
                tx.emit("model", key, kind, {**data, "model_key": key, "runner_id": self.runner_id})

        self.store.write(record)
        notices.clear()


class _Worker:
    """The one thread that runs handlers (one per device), fed through two queues: lighter than an
    executor's futures, which matters when steps are short."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="engine-worker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._requests.get()) is not None:
            handler, context = job
            try:
                self._results.put((True, handler(context)))
            except BaseException as exc:  # handed to the runner thread, which records it
                self._results.put((False, exc))

    def start(self, handler, context) -> None:
        self._requests.put((handler, context))

    def result(self, timeout: float):
        """The handler's result (or its exception, raised here); queue.Empty while it still runs."""
        ok, value = self._results.get(timeout=timeout)
        if ok:
            return value
        try:
            raise value
        finally:
            del value  # else frame -> error -> traceback -> frame: the step's tensors live until a gc pass

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()


class _Progress:
    """The latest progress a handler reported, handed to the store at most so often."""

    def __init__(self) -> None:
        self._value: tuple[float, str] | None = None
        self._sent_at = 0.0
        self._lock = threading.Lock()

    def set(self, fraction: float, message: str = "") -> None:
        with self._lock:
            self._value = (float(fraction), message)

    def take_if_due(self, every: float) -> tuple[float, str] | None:
        now = time.monotonic()
        with self._lock:
            if self._value is None or now - self._sent_at < every:
                return None
            value, self._value, self._sent_at = self._value, None, now
            return value
