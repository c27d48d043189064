"""The runner: one worker per device; each claims steps under a lease, runs their handler on its
device in its own thread, and records the result.

A runner process registers itself (engine.run.fleet), takes back the steps of runners that died and
runs one `_Lane` per device of `[runner] devices`: a claim loop with a handler thread, its own warm
model cache and its own claims (only sessions its device may run, preferring the models it has
warm: engine.run.affinity). While a handler runs, its lane renews the lease, watches for pause and
cancel (setting the handler's cancellation token), and writes throttled progress. A step's
completion and the claim of the next step commit in one transaction; the step's files are renamed
into the outbox right after that commit. When a handler returns with files still being written (an
inference call's PNGs), the next call is claimed and started on the device first, so the device
does not wait for the disk.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import socket
import threading
import time
import queue
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from engine import __version__, metrics, queries
from engine.run import claims, fleet
from engine.run.affinity import Offer
from engine.errors import Cancelled, EngineError, StaleLease
from engine.run.failures import Failure, classify
from engine.params import StepParams
from engine.run.handlers import CancellationToken, Registry, StepContext, StepResult
from engine.run.claims import Claim, Policy
from engine.outage import Outage
from engine.run.recovery import recover, sweep_attempts
from engine.store import STORE_ERRORS, Store, StoreUnavailable, Tx, first_line, is_lost_connection
from engine.store.follow import Follower

log = logging.getLogger("engine.runner")


def default_runner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def lane_names(device_ids: list[str]) -> list[str]:
    """A name per worker: its device's id, numbered when a device has several workers (cpu#1, cpu#2)."""
    names = []
    for index, device_id in enumerate(device_ids):
        if device_ids.count(device_id) == 1:
            names.append(device_id)
        else:
            names.append(f"{device_id}#{device_ids[: index + 1].count(device_id)}")
    return names


# What only a control makes (a user's pause, resume, cancel, restart, delete), logged when seen.
CONTROL_EVENTS = tuple(f"{stream}.{verb}" for stream in ("session", "batch")
                       for verb in ("paused", "resumed", "cancelled", "restarted", "deleted"))


class Runner:
    def __init__(self, engine, runner_id: str | None = None, on_step: Callable[[Claim, str], None] | None = None,
                 devices: list | None = None) -> None:
        """`engine`: the installation (engine.app.Engine) whose store, handlers and outbox this
        runner works with. `devices`: the DeviceInfo of each worker; by default `[runner] devices`
        resolved here."""
        config = engine.config
        self.engine = engine
        self.config = config
        self.store = engine.store
        self.runner_id = runner_id or default_runner_id()
        self.policy = Policy.from_config(config)
        self.share = claims.FairShare.from_config(config)
        self.outbox = engine.outbox
        self.results = engine.results
        registry = engine.handlers
        runner = config.values["runner"]
        self.heartbeat_every = runner["heartbeat_seconds"]
        self.control_every = runner["control_poll_seconds"]
        self.idle_sleep = runner["idle_poll_seconds"]
        self.wake_every = runner["wake_poll_seconds"]
        self.lookahead = max(1, int(runner["affinity_lookahead"]))
        self.progress_every = 1.0 / max(runner["progress_writes_per_second"], 0.01)
        # result.json and summary.json of what a step ended are written off the claim loop, in
        # order (Results.deferred); a crash before they are written is mended by recovery.
        self.results.start_background()
        self.stop_event = threading.Event()
        # Set by a stop that interrupts running steps (Ctrl-C, SIGTERM): each is handed back at its
        # handler's next check (a denoising step), its attempt not used.
        self.interrupting = threading.Event()
        # The tokens of every call running now, so that a stop reaches them at once, whatever their
        # lane's thread is waiting for (a write lock, a slow disk, a database that is away).
        self._running: set[CancellationToken] = set()
        self._running_lock = threading.Lock()
        self.on_step = on_step or (lambda claim, outcome: None)
        self.steps_done = 0
        self._counting = threading.Lock()
        self.batching = config.values["batching"]
        self._last_beat = self._last_reap = self._last_sweep = time.monotonic()
        self._housekeeping_lock = threading.Lock()
        self._controls: Follower | None = None  # the controls _log_controls has said
        if devices is None:
            from engine.domains.device import discover, worker_devices

            devices = worker_devices(runner["devices"], config.get("device", "preferred"), discover())
        names = lane_names([device.id for device in devices])
        self.lanes = [_Lane(self, device, name, registry if number == 0 else registry.for_another_worker())
                      for number, (device, name) in enumerate(zip(devices, names))]
        self.devices = names

    @property
    def registry(self) -> Registry:
        """The first worker's handlers and warm models (the only worker's, mostly)."""
        return self.lanes[0].registry

    def warm_models(self) -> list[str]:
        """`model@worker` for each model a worker keeps warm."""
        return [f"{model}@{lane.name}" for lane in self.lanes for model in lane.registry.warm_models()]

    def memory(self) -> dict[str, dict]:
        """Each worker's device memory now (see engine.domains.memory.usage)."""
        from engine.domains.memory import usage

        found = {}
        for lane in self.lanes:
            try:
                found[lane.name] = usage(lane.device)
            except Exception as exc:  # a device that will not say: its heartbeat still goes out
                found[lane.name] = {"error": f"{type(exc).__name__}: {exc}"}
        return found

    def count_step(self) -> None:
        with self._counting:
            self.steps_done += 1

    # the loop ------------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        dead = fleet.find_dead_here(self.store, self.runner_id)
        fleet.mark_gone(self.store, dead)
        return recover(self.store, self.outbox, self.policy, [self.runner_id, *dead])

    def run(self, until_idle: bool = False, before_idle_check: Callable[[], bool] | None = None) -> int:
        """Run steps until stopped (or, with until_idle, until nothing is left to do): each worker's
        loop in a thread of its own, this one waiting.

        Nothing that goes wrong in one turn of a loop (the database, the disk) stops the runner:
        it is logged, the worker waits a moment and goes on; a step it held is taken back when its
        lease expires, as after a crash."""
        if not self._start_up(until_idle):
            return self.steps_done
        from engine.notify.deliver import Deliverer

        deliverer = Deliverer(self.engine, self.runner_id)
        deliverer.start()
        try:
            return self._run_lanes(until_idle, before_idle_check, deliverer)
        finally:
            deliverer.stop()

    def _run_lanes(self, until_idle: bool, before_idle_check, deliverer) -> int:
        """Every worker's loop in a thread of its own; this thread only waits for the first one, so
        that it stays free for signals (a Python signal handler runs in the main thread, and not
        while that thread is inside a database call). The first worker's loop says when to stop (it
        alone knows until_idle); what it raised is raised here."""
        done = threading.Event()
        raised: list[BaseException] = []

        def first() -> None:
            try:
                self.lanes[0].loop(done, until_idle, before_idle_check)
            except BaseException as exc:  # handed to the waiting thread
                raised.append(exc)

        threads = [threading.Thread(target=first, name=f"engine-lane-{self.lanes[0].name}", daemon=True)]
        threads += [threading.Thread(target=lane.loop, args=(done,), name=f"engine-lane-{lane.name}", daemon=True)
                    for lane in self.lanes[1:]]
        for thread in threads:
            thread.start()
        try:
            while threads[0].is_alive():
                threads[0].join(0.5)
        except BaseException:  # KeyboardInterrupt where no handler is installed: stop as a signal would
            self.interrupt()
            raise
        finally:
            done.set()
            for thread in threads:
                thread.join()
        if raised:
            raise raised[0]
        if until_idle and not self.stop_event.is_set():
            self.results.caught_up()  # every result.json is written before we say idle
            while deliverer.send_due(wait=True):  # what is due now gets its attempt before we exit
                pass
            self.results.retry()
            if self.results.pending():  # a full or read-only outbox: the next start writes them
                log.warning("some outbox files could not be written; the next start of a runner writes them")
        return self.steps_done

    def _start_up(self, until_idle: bool) -> bool:
        """Register and recover; while the database cannot be reached, say so once and keep trying
        with backoff (with until_idle, give up after [database] reconnect_seconds: StoreUnavailable).
        False when stopped meanwhile."""
        outage, waited, pause = Outage(log, "reaching the database at start"), time.monotonic(), 0.5
        while not self.stop_event.is_set():
            try:
                fleet.register(self.store, self.runner_id, self.policy.lease_seconds, __version__, self.devices)
                self.recover()
                self._log_controls()  # from here on, each control made anywhere gets its line
                outage.ok()
                return True
            except STORE_ERRORS as exc:
                if not is_lost_connection(exc) and not isinstance(exc, StoreUnavailable):
                    raise
                if until_idle and time.monotonic() - waited > self.store.reconnect_seconds:
                    raise StoreUnavailable(f"cannot reach the database: {first_line(exc)}") from None
                outage.failed(exc, traceback=False)
                self.stop_event.wait(pause)
                pause = min(pause * 2, 10.0)
        return False

    def housekeeping(self) -> None:
        """On a timer, between a worker's steps (one worker at a time): renew this runner's
        registration, take back the steps of runners that died (on this host at once, elsewhere
        when their lease expires), remove the attempt folders they left, and retry outbox writes
        that failed (a full or read-only disk)."""
        if not self._housekeeping_lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if now - self._last_beat >= self.heartbeat_every:
                self._last_beat = now
                fleet.beat(self.store, self.runner_id, self.policy.lease_seconds, self.warm_models(),
                           self.memory())
                dead = fleet.find_dead_here(self.store, self.runner_id)
                if dead:
                    fleet.mark_gone(self.store, dead)
                    taken = claims.reap_expired(self.store, self.policy, dead_runners=dead)
                    log.warning("runner(s) %s on this host are gone; took back %d step(s)", ", ".join(dead), taken)
                self.results.retry()
                self._log_controls()
            if now - self._last_reap > self.policy.lease_seconds / 2:
                self._last_reap = now
                claims.reap_expired(self.store, self.policy)
            if now - self._last_sweep > max(4 * self.policy.lease_seconds, 5.0):
                self._last_sweep = now
                sweep_attempts(self.store, self.outbox)  # what runners that died elsewhere left in the outbox
        finally:
            self._housekeeping_lock.release()

    def _log_controls(self) -> None:
        """A line for each control made since the last look, wherever it was made (the CLI, the
        stdio worker, a control file), so the runner's log says why a session ended or stopped."""
        if self._controls is None:
            self._controls = Follower(self.store, types=CONTROL_EVENTS)
            return
        for event in self._controls.new(500):
            log.info("%s %s %s (by request)", event["stream_type"], event["stream_id"], event["type"].split(".", 1)[1])

    def stop(self) -> None:
        """Stop after the steps running now have been recorded."""
        self.stop_event.set()

    def interrupt(self) -> None:
        """Stop now: running steps are interrupted at their handler's next check and handed back
        (their attempts not used); one that finishes first is recorded. Leases are renewed until then.
        The running calls' tokens are set here, at once: no database round trip stands between a
        stop and the handler."""
        self.interrupting.set()
        self.stop_event.set()
        with self._running_lock:
            for token in self._running:
                if not token.is_set:
                    token.set("stopping")

    def running(self, tokens: list[CancellationToken]) -> None:
        """A call with these tokens started (one set at once when a stop came first)."""
        with self._running_lock:
            self._running.update(tokens)
            if self.interrupting.is_set():
                for token in tokens:
                    if not token.is_set:
                        token.set("stopping")

    def ended(self, tokens: list[CancellationToken]) -> None:
        with self._running_lock:
            self._running.difference_update(tokens)

    def abandon(self) -> int:
        """The last thing before exiting at once: this runner's running steps are taken back now
        (as a recovery: they keep their attempts), so no other runner waits for its lease to lapse."""
        taken = claims.reap_expired(self.store, self.policy, dead_runners=[self.runner_id])
        fleet.stopped(self.store, self.runner_id)
        return taken

    def close(self) -> None:
        for lane in self.lanes:
            lane.handler_thread.close()
        self.results.caught_up()
        try:
            self._log_controls()  # a control that ended the last session, before the next beat
        except STORE_ERRORS:
            pass
        try:
            fleet.stopped(self.store, self.runner_id)
        except Exception:
            log.exception("could not record that runner %s stopped", self.runner_id)

    def wait_for_work(self) -> None:
        """An idle pause: until the log has a new event (a job submitted by any process on any
        host, a session resumed, a step handed back), looked for every `wake_poll_seconds` with one
        cheap read, or at most `idle_poll_seconds` (for what time alone makes ready: a retry's
        backoff, a lease run out)."""
        deadline = time.monotonic() + self.idle_sleep
        try:
            seen = self.store.newest_event_id() if self.wake_every > 0 else None
        except STORE_ERRORS:
            seen = None  # the claim that follows meets the database's trouble and says so
        if seen is None:
            self.stop_event.wait(self.idle_sleep)
            return
        while not self.stop_event.is_set() and (left := deadline - time.monotonic()) > 0:
            self.stop_event.wait(min(self.wake_every, left))
            try:
                if self.store.newest_event_id() != seen:
                    return
            except STORE_ERRORS:
                return

    def nothing_left(self) -> bool:
        """No step is running anywhere and none is waiting to run (queries.nothing_left)."""
        return queries.nothing_left(self.store)


class _Lane:
    """One worker of a runner: a device, the thread that runs handlers on it, its own handlers'
    shared state (its warm model cache), and the loop that claims what this device may run."""

    def __init__(self, runner: Runner, device, name: str, registry: Registry) -> None:
        self.runner, self.device, self.name, self.registry = runner, device, name, registry
        self.store, self.config, self.policy, self.outbox = runner.store, runner.config, runner.policy, runner.outbox
        self.runner_id, self.batching, self.stop_event = runner.runner_id, runner.batching, runner.stop_event
        self.heartbeat_every, self.control_every = runner.heartbeat_every, runner.control_every
        self.progress_every, self.on_step = runner.progress_every, runner.on_step
        self.handler_thread = _HandlerThread(name)
        self.database = Outage(log, f"worker {name}: renewing leases")

    def offer(self) -> Offer:
        """What this worker claims: sessions its device may run, preferring its warm models."""
        return Offer(self.device.id, self.device.kind, frozenset(self.registry.warm_models()), self.runner.lookahead,
                     self.name)

    def claim(self, tx: Tx | None = None) -> list[Claim]:
        if tx is not None:
            return claims.claim_group_in(tx, self.runner_id, self.policy, self.batching, self.offer(), self.runner.share)
        return claims.claim_group(self.store, self.runner_id, self.policy, self.batching, self.offer(), self.runner.share)

    def loop(self, done: threading.Event, until_idle: bool = False,
             before_idle_check: Callable[[], bool] | None = None) -> None:
        """Claim and run until the runner stops or `done` is set; with until_idle, return once
        nothing is left to do anywhere."""
        group: list[Claim] = []
        outage = Outage(log, f"worker {self.name}")
        while not self.stop_event.is_set() and not done.is_set():
            try:
                self.runner.housekeeping()  # on its timer, busy or not: a busy cluster still takes back dead steps
                if not group:
                    group = self.claim()
                if group:
                    group = self.execute(group)
                    outage.ok()
                    continue
                if until_idle and (before_idle_check is None or before_idle_check()) and self.runner.nothing_left():
                    return
                outage.ok()
            except Exception as exc:  # the database, the disk, a bug: said once, then summed up
                outage.failed(exc, traceback=not isinstance(exc, STORE_ERRORS))
                group = []
                self.stop_event.wait(1.0)
                continue
            self.runner.wait_for_work()

    # one step ------------------------------------------------------------------------------

    def execute(self, group: "list[Claim] | _Call") -> "list[Claim] | _Call":
        """Run claimed steps to their recorded end: one path for a single step (a group of one)
        and a group that shares one handler call (perhaps already started). Returns the next
        group, if one was claimed meanwhile."""
        if isinstance(group, _Call):
            return self._finish_call(group)
        try:
            call = self._start_call(group)
        except STORE_ERRORS:
            raise
        except Exception as exc:  # no handler for this step type here (another host's config), say
            return self._failed(group, self._failure(group, exc), [None] * len(group))
        return self._finish_call(call)

    def _start_call(self, group: list[Claim]) -> "_Call":
        """Hand a group to the worker: every claim's context in one handler call (a handler that
        serves no groups gets its one claim's context)."""
        made = [self._context(claim) for claim in group]
        contexts = [context for context, _, _, _ in made]
        progress, notices = made[0][2], made[0][3]
        for context in contexts:
            context.progress, context.notify = progress.set, lambda kind, data: notices.append((kind, data))
        _log_starts(group)
        grouped = self.registry.serves_groups(group[0].step_type)
        self.runner.running([context.token for context in contexts])
        ticket = self.handler_thread.start(self.registry.get(group[0].step_type), contexts if grouped else contexts[0])
        return _Call(group, contexts, progress, notices, ticket, time.monotonic(), grouped)

    def _finish_call(self, call: "_Call") -> "list[Claim] | _Call":
        """Wait for a group's handler call and record its outcome. A session paused or cancelled
        meanwhile does not stop the others: its result is not recorded (its lease is gone); the call
        stops only when every session in it stopped. When the handler left files being written,
        the next group is claimed and started on the device before they are waited for."""
        group, contexts = call.group, call.contexts
        work_dirs = lambda: [_written(c) for c in contexts]  # noqa: E731 (read after the handler ran)
        tokens = [c.token for c in contexts]
        try:
            try:
                results = self._wait(call.ticket, group, tokens, call.progress)
                results = results if call.grouped else [results]
            finally:
                self.runner.ended(tokens)
                self._record_notices(call.notices)
        except Cancelled:
            for claim, context in zip(group, contexts):
                self._interrupted(claim, context.token, _written(context))
            return []
        except STORE_ERRORS:  # the database's, not the step's: its lease lapses and it is recovered
            raise
        except Exception as exc:
            return self._failed(group, self._failure(group, exc), work_dirs())
        duration = time.monotonic() - call.started
        # A shared call's images are still being written: the next group starts on the device meanwhile.
        follow = self._claim_and_start() if call.grouped and any(r.writing for r in results) else []
        try:
            _wait_for_files(results)
        except Exception as exc:  # the disk's: the attempt failed, the call already started goes on
            self._failed(group, self._failure(group, exc), work_dirs())
            return follow
        # A session paused while the others' images went on: its own are dropped, its step handed
        # back (its attempt unused) to run again when it is resumed; nothing of it is published.
        # A step that ran alone and finished though paused is recorded (it completes when resumed).
        paused = {n for n, context in enumerate(contexts) if context.token.reason == "paused" and call.grouped}
        for number in sorted(paused):
            self._interrupted(group[number], contexts[number].token, work_dirs()[number])
        kept = [n for n in range(len(group)) if n not in paused]
        if not kept:
            return follow
        claimed = self._completed([group[n] for n in kept], [results[n] for n in kept], duration,
                                  [work_dirs()[n] for n in kept], claim_next=not follow)
        return follow or claimed

    def _claim_and_start(self) -> "list[Claim] | _Call":
        """Claim the next group now and start it on the worker. Steps that are no shared call
        (device discovery, a model's load: the steps that let sessions join the next call) run
        first, one after another."""
        if self.stop_event.is_set():
            return []
        group = self.claim()
        while group and not self.registry.serves_groups(group[0].step_type) and not self.stop_event.is_set():
            group = self.execute(group)
        if group and self.registry.serves_groups(group[0].step_type):
            return self._start_call(group)
        return group

    def _context(self, claim: Claim) -> tuple[StepContext, CancellationToken, "_Progress", list]:
        token, progress, notices = CancellationToken(), _Progress(), []
        context = StepContext(
            session_id=claim.session_id, run=claim.run, step_index=claim.step_index, step_type=claim.step_type,
            domain=claim.domain, attempt=claim.attempt, params=StepParams.of(claim.params), step_config=claim.step_config,
            previous=self._previous_outputs(claim),
            attempt_dir=self.outbox.attempt_dir(claim.session_id, claim.run, claim.step_index, claim.attempt),
            inbox=self.config.inbox, token=token, progress=progress.set, config=self.config,
            shared=self.registry.shared, notify=lambda kind, data: notices.append((kind, data)),
            device=self.device,
        )
        return context, token, progress, notices

    @staticmethod
    def _failure(group: list[Claim], exc: Exception) -> Failure:
        failure = classify(exc)
        if not isinstance(exc, EngineError):
            log.warning("step %s of %s failed: %s", group[0].step_index, ", ".join(c.session_id for c in group),
                        failure.message, exc_info=log.isEnabledFor(logging.DEBUG))
        return failure

    def _wait(self, ticket: int, held: list[Claim], tokens: list[CancellationToken], progress: "_Progress"):
        """Wait for the handler, renewing the leases and passing pause and cancel on to it."""
        last_beat = time.monotonic()
        while True:
            try:
                return self.handler_thread.result(ticket, timeout=self.control_every)
            except queue.Empty:
                pass
            # A stop (Ctrl-C, SIGTERM) sets the tokens itself (Runner.interrupt), not this loop.
            now = time.monotonic()
            value = progress.take_if_due(self.progress_every)
            beat = now - last_beat >= self.heartbeat_every
            try:
                if value is not None or beat:  # one transaction for every claim of the call
                    states = claims.heartbeat_all(self.store, held, self.policy, *(value or (None, None)))
                else:
                    states = [(True, status) for status in
                              claims.session_statuses(self.store, [claim.session_id for claim in held])]
                if beat:
                    fleet.beat(self.store, self.runner_id, self.policy.lease_seconds)
                self.database.ok()
            except STORE_ERRORS as exc:
                # The database's trouble, not the handler's: it goes on, and the next look tries again
                # on a new connection (a lease that lapses meanwhile is a recovery, not a failure).
                self.database.failed(exc, traceback=False)
                continue
            for token, (owned, status) in zip(tokens, states):
                if not owned:
                    token.set("lease lost")
                if status in (None, "cancelled", "deleted"):
                    token.set("cancelled")
                elif status == "paused":
                    token.set("paused")
            if value is not None or beat:
                last_beat = now

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

    def _completed(self, group: list[Claim], results: list[StepResult], duration: float, work_dirs,
                   claim_next: bool = True) -> list[Claim]:
        """Record every completion of one call in one transaction, with the next group's claim
        (unless claim_next is False: one was claimed already). A claim whose lease was lost
        meanwhile (its session cancelled, or taken over) is not recorded and its files are
        discarded; the others are."""
        outputs = [{"images": list(r.images), "files": list(r.files), "data": r.data} for r in results]
        stale: dict[int, str] = {}  # claim number -> its session's status now ("" when deleted)

        def record(tx: Tx) -> list[Claim]:
            stale.clear()  # a retried transaction starts over
            for number, (claim, output) in enumerate(zip(group, outputs)):
                try:
                    claims.complete_in(tx, claim, output, duration)
                except StaleLease:
                    session = tx.get("sessions", (claim.session_id,))
                    stale[number] = session["status"] if session else ""
            if self.stop_event.is_set() or not claim_next:
                return []
            return self.claim(tx)

        # The steps' files are published before the sessions' result.json is written (in the
        # background, once this block ends: Results.deferred).
        with self.runner.results.deferred():
            next_group = self.store.write(record)
            self._publish(group, outputs, work_dirs, stale)
        for number, (claim, output) in enumerate(zip(group, outputs)):
            if number not in stale:
                metrics.step_completed(claim.domain, duration, output["data"], len(output["images"]))
        if outputs and outputs[0]["data"].get("call_id"):
            metrics.call_made(outputs[0]["data"])
        return next_group

    def _publish(self, group: list[Claim], outputs: list[dict], work_dirs, stale: dict[int, str]) -> None:
        for number, (claim, output, work_dir) in enumerate(zip(group, outputs, work_dirs)):
            if number in stale and stale[number] in ("cancelled", ""):  # what the user asked for
                log.info("session %s was %s while step %d (%s) ran; its result is discarded", claim.session_id,
                         stale[number] or "deleted", claim.step_index, claim.step_type)
            elif number in stale:
                log.warning("step %d (%s) of session %s: its lease was lost meanwhile (the step taken over by another "
                            "runner); this result is discarded", claim.step_index, claim.step_type, claim.session_id)
            if number in stale:
                self.outbox.discard(work_dir)
                self.on_step(claim, "stale")
                continue
            self.runner.results.publish(work_dir, self.outbox.dir_of(claim.session_ref), output["images"] + output["files"])
            self.runner.count_step()
            self.on_step(claim, "completed")

    def _failed(self, group: list[Claim], failure: Failure, work_dirs) -> list[Claim]:
        for work_dir in work_dirs:
            self.outbox.discard(work_dir)
        stale: set[int] = set()

        def record(tx: Tx) -> None:
            stale.clear()
            for number, claim in enumerate(group):
                try:
                    claims.fail_in(tx, claim, failure.code, failure.message, failure.retryable, self.policy)
                except StaleLease:
                    stale.add(number)

        with self.runner.results.deferred():
            _, events = self.store.write_events(record)
        retried = {e.stream_id for e in events if e.type == "step.retried"}
        for number, claim in enumerate(group):
            if number not in stale:
                metrics.STEPS.labels(domain=claim.domain,
                                     outcome="retried" if claim.session_id in retried else "failed").inc()
                log.warning("step %d (%s) of session %s (job %s) failed, attempt %d: %s: %s; %s", claim.step_index,
                            claim.step_type, claim.session_id, claim.job_id or "-", claim.attempt, failure.code,
                            failure.message, "it will be retried" if claim.session_id in retried else "the session failed")
            self.on_step(claim, "stale" if number in stale else "failed")
        return []

    def _interrupted(self, claim: Claim, token: CancellationToken, work_dir) -> list[Claim]:
        """A step stopped before its end: its files discarded; paused, or this runner stopping, it is
        handed back with its attempt unused (a cancelled one's lease is gone already)."""
        self.outbox.discard(work_dir)
        if token.reason in ("paused", "stopping"):
            try:
                self.store.write(lambda tx: claims.release_in(tx, claim, token.reason))
            except StaleLease:
                pass
        self.on_step(claim, token.reason or "interrupted")
        return []

    def _record_notices(self, notices: list[tuple[str, dict[str, Any]]]) -> None:
        """Models loaded or measured on the way; the database's trouble here is no step's failure."""
        try:
            record_model_notices(self.store, self.runner_id, notices, self.name)
        except STORE_ERRORS as exc:
            log.warning("could not record %d model notice(s): %s", len(notices), first_line(exc))
        notices.clear()


def record_model_notices(store: Store, runner_id: str, notices: list[tuple[str, dict[str, Any]]],
                         worker: str = "") -> None:
    """What handlers noticed of models (loaded, measured, compiled...), as events of the model's
    stream for this runner's worker (`<runner id>:<worker>:<model id>`; `<runner id>:<model id>`
    outside a worker)."""
    if not notices:
        return

    def record(tx: Tx) -> None:
        for kind, data in notices:
            key = ":".join(part for part in (runner_id, worker, data["model_id"]) if part)
            tx.emit("model", key, kind, {**data, "model_key": key, "runner_id": runner_id})

    store.write(record)


def _wait_for_files(results: list[StepResult]) -> None:
    """Every result's files written or failed, none still being written (so that a failed
    attempt's folders can be discarded); raises the first write's error."""
    concurrent.futures.wait([future for result in results for future in result.writing])
    for result in results:
        result.wait_for_files()


def _log_starts(group: list[Claim]) -> None:
    for claim in group:
        if claim.step_index == 0 and claim.attempt == 1:
            log.info("session %s (job %s, %s) started", claim.session_id, claim.job_id or "-", claim.workflow_id)


def _written(context: StepContext):
    """The attempt's folder, or None when the handler wrote nothing."""
    return context.attempt_dir if context.work_dir_made else None


@dataclass
class _Call:
    """A group handed to the worker, and what the runner watches it with."""

    group: list[Claim]
    contexts: list[StepContext]
    progress: "_Progress"
    notices: list
    ticket: int
    started: float
    grouped: bool  # the handler serves groups: it got every context and returns a result for each


class _HandlerThread:
    """The one thread that runs handlers (one per device), fed through two queues: lighter than an
    executor's futures, which matters when steps are short. Each call has a ticket: a result the
    runner no longer waits for (its loop hit an error meanwhile) is dropped, never taken for
    another call's."""

    def __init__(self, name: str = "") -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name=f"engine-worker-{name}".rstrip("-"), daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._requests.get()) is not None:
            ticket, handler, context = job
            try:
                self._results.put((ticket, True, handler(context)))
            except BaseException as exc:  # handed to the runner thread, which records it
                self._results.put((ticket, False, exc))

    def start(self, handler, context) -> int:
        ticket = next(self._tickets)
        self._requests.put((ticket, handler, context))
        return ticket

    def result(self, ticket: int, timeout: float):
        """The handler's result (or its exception, raised here); queue.Empty while it still runs."""
        deadline = time.monotonic() + timeout
        while True:
            done, ok, value = self._results.get(timeout=max(deadline - time.monotonic(), 0))
            if done == ticket:
                break
            del value  # an abandoned call's
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
