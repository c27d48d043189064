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

from engine import __version__, lifecycle, runners
from engine.errors import Cancelled, EngineError, StaleLease
from engine.failures import Failure, classify
from engine.handlers import CancellationToken, Registry, StepContext, StepResult
from engine.lifecycle import Claim, Policy
from engine.outbox import Outbox, OwedWrites
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
        self.devices = [str(config.get("device", "preferred"))]
        self._owed = OwedWrites(self.outbox)
        self._last_beat = self._last_reap = time.monotonic()

    # the loop ------------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        dead = runners.find_dead_here(self.store, self.runner_id)
        runners.mark_gone(self.store, dead)
        return recover(self.store, self.outbox, self.policy, [self.runner_id, *dead])

    def run(self, until_idle: bool = False, before_idle_check: Callable[[], bool] | None = None) -> int:
        """Run steps until stopped (or, with until_idle, until nothing is left to do).

        Nothing that goes wrong in one turn of the loop (the database, the disk) stops the runner:
        it is logged, the runner waits a moment and goes on; a step it held is taken back when its
        lease expires, as after a crash."""
        runners.register(self.store, self.runner_id, self.policy.lease_seconds, __version__, self.devices)
        self.recover()
        claim: Claim | None = None
        while not self.stop_event.is_set():
            try:
                if claim is None:
                    claim = lifecycle.claim(self.store, self.runner_id, self.policy)
                if claim is not None:
                    claim = self.execute(claim)
                    continue
                self._housekeeping()
                if until_idle and (before_idle_check is None or before_idle_check()) and self.nothing_left():
                    self._finisher_caught_up()  # every result.json is written before we say idle
                    if not self._owed.pending():
                        break
            except Exception:
                log.exception("the runner's loop hit an error; going on in a moment")
                claim = None
                self.stop_event.wait(1.0)
                continue
            self.stop_event.wait(self.idle_sleep)
        return self.steps_done

    def _housekeeping(self) -> None:
        """On a timer while idle: renew this runner's registration, take back the steps of runners
        that died (on this host at once, elsewhere when their lease expires), and retry outbox
        writes that failed (a full or read-only disk)."""
        now = time.monotonic()
        if now - self._last_beat >= self.heartbeat_every:
            self._last_beat = now
            runners.beat(self.store, self.runner_id, self.policy.lease_seconds, self.registry.warm_models())
            dead = runners.find_dead_here(self.store, self.runner_id)
            if dead:
                runners.mark_gone(self.store, dead)
                taken = lifecycle.reap_expired(self.store, self.policy, dead_runners=dead)
                log.warning("runner(s) %s on this host are gone; took back %d step(s)", ", ".join(dead), taken)
            self._owed.retry(self.store)
        if now - self._last_reap > self.policy.lease_seconds / 2:
            self._last_reap = now
            lifecycle.reap_expired(self.store, self.policy)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.worker.close()
        self.finisher.shutdown(wait=True)
        try:
            runners.stopped(self.store, self.runner_id)
        except Exception:
            log.exception("could not record that runner %s stopped", self.runner_id)

    def _finisher_caught_up(self) -> None:
        """Returns once everything handed to the finisher is written (it runs in order)."""
        self.finisher.submit(lambda: None).result()

    def _finish(self, events, rows: dict | None = None) -> None:
        if any(e.type.startswith(("session.", "batch.")) for e in events):
            self.finisher.submit(self._owed.finish, self.store, events, rows)

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
        except Exception as exc:  # the handler's error, a library's, the disk's: the attempt failed
            failure = classify(exc)
            if not isinstance(exc, EngineError):
                log.warning("step %s of %s failed: %s", claim.step_index, claim.session_id, failure.message,
                            exc_info=log.isEnabledFor(logging.DEBUG))
            return self._failed(claim, failure, written())
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
                if now - last_beat >= self.heartbeat_every:
                    runners.beat(self.store, self.runner_id, self.policy.lease_seconds)
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
        self._owed.publish(work_dir, self.outbox.dir_of(claim.session_ref), output["images"] + output["files"])
        self._finish(events, ended)
        self.steps_done += 1
        self.on_step(claim, "completed")
        return next_claim

    def _failed(self, claim: Claim, failure: Failure, work_dir) -> None:
        self.outbox.discard(work_dir)
        try:
            _, events = self.store.write_events(lambda tx: lifecycle.fail_in(
                tx, claim, failure.code, failure.message, failure.retryable, self.policy))
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
