"""Handlers for tests and benchmarks (no-op, sleep, fail-N-times, write-a-file, cap-memory), registered
through the same `handlers.modules` mechanism the real domains use."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from engine.errors import StepFailed
from engine.run.handlers import Registry, StepContext, StepResult


def noop(ctx: StepContext) -> StepResult:
    return StepResult()


def sleep(ctx: StepContext) -> StepResult:
    """Sleeps `config.seconds` (or params.steps / 10), polling the token like a denoise loop."""
    seconds = float(ctx.step_config.get("seconds", ctx.params.steps / 10))
    ticks = max(1, int(seconds / 0.02))
    for tick in range(ticks):
        ctx.token.raise_if_set()
        time.sleep(seconds / ticks)
        ctx.progress((tick + 1) / ticks, f"tick {tick + 1}/{ticks}")
    return StepResult(data={"slept": seconds})


def fail_n_times(ctx: StepContext) -> StepResult:
    """Fails its first `config.failures` attempts (params.seed % 10 when absent), then succeeds."""
    failures = int(ctx.step_config.get("failures", (ctx.params.seed or 0) % 10))
    if ctx.attempt <= failures:
        raise StepFailed(f"planned failure {ctx.attempt} of {failures}")
    return StepResult(data={"attempt": ctx.attempt})


def write_file(ctx: StepContext) -> StepResult:
    """Writes one file named after the step into the attempt folder; a short pause inside
    (ENGINE_TEST_WRITE_PAUSE seconds) gives recovery tests a window to kill the runner."""
    name = f"step-{ctx.step_index}.txt"
    path = Path(ctx.work_dir) / name
    with open(path, "w") as handle:
        handle.write(f"{ctx.session_id} step {ctx.step_index} attempt {ctx.attempt}\n")
        time.sleep(float(os.environ.get("ENGINE_TEST_WRITE_PAUSE", "0")))
        handle.write("done\n")
    return StepResult(files=[name], data={"bytes": path.stat().st_size})


def raise_error(ctx: StepContext) -> StepResult:
    """Raises the built-in exception named by `config.error` with `config.message`, every attempt."""
    import builtins

    raise getattr(builtins, ctx.step_config["error"])(ctx.step_config.get("message", "planned"))


def cap_memory(ctx: StepContext) -> StepResult:
    """Lowers this process's address-space limit to what it uses now plus ENGINE_TEST_HEADROOM_MIB,
    so that a later step's large allocations really fail (the runner must be its own process)."""
    import resource

    headroom = int(os.environ["ENGINE_TEST_HEADROOM_MIB"]) * 2**20
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return StepResult(data={"limit_bytes": used + headroom})


_calls = threading.Condition()
_calls_started = 0


def _in_a_thread(function, *args) -> Future:
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def _write_when_next_call_starts(number: int, path: Path, text: str) -> None:
    """Write the file once call number+1 started (or 3 s passed), saying whether it had."""
    with _calls:
        started = _calls.wait_for(lambda: _calls_started > number, timeout=3.0)
    path.write_text(f"{text}next call started before this file was written: {started}\n")


def write_group(contexts: list[StepContext]) -> list[StepResult]:
    """Serves a group in one call: each session gets a file naming the call and how many images it
    made (params.num_images each); ENGINE_TEST_WRITE_PAUSE pauses inside, as write_file does.
    With the step's config late_files the files are written after the handler returns, as inference writes
    its PNGs, once the device's next call started (or 3 s passed), and say which it was."""
    import uuid

    global _calls_started
    with _calls:
        _calls_started += 1
        number = _calls_started
        _calls.notify_all()
    call_id, images = uuid.uuid4().hex[:12], sum(c.params.num_images for c in contexts)
    started = time.perf_counter()
    time.sleep(float(os.environ.get("ENGINE_TEST_WRITE_PAUSE", "0")) or 0.001)
    if all(c.token.is_set for c in contexts):
        contexts[0].token.raise_if_set()
    measure = contexts[0].step_config.get("measure")  # [per_image_bytes, available_bytes]: as inference reports
    if measure:
        p = contexts[0].params
        contexts[0].notify("model.measured", {"model_id": p.model, "width": p.width or 0,
                                              "height": p.height or 0, "mode": "", "device": "test",
                                              "per_image_bytes": measure[0], "available_bytes": measure[1],
                                              "call_images": images})
    results = []
    for ctx in contexts:
        name, text = f"step-{ctx.step_index}.txt", f"{ctx.session_id} attempt {ctx.attempt} call {call_id} of {images}\n"
        writing = []
        if ctx.step_config.get("late_files"):
            writing = [_in_a_thread(_write_when_next_call_starts, number, Path(ctx.work_dir) / name, text)]
        else:
            (Path(ctx.work_dir) / name).write_text(text)
        results.append(StepResult(files=[name], writing=writing, data={
            "call_id": call_id, "call_images": images, "group_seconds": time.perf_counter() - started}))
    return results


def deaf_sleep(ctx: StepContext) -> StepResult:
    """Sleeps params.steps / 10 seconds without looking at the token: a call that cannot be
    interrupted (a long C++ call, a library with no step callback)."""
    time.sleep(ctx.params.steps / 10)
    return StepResult(data={"slept": ctx.params.steps / 10})


def register(registry: Registry) -> None:
    registry.add("noop", noop)
    registry.add("sleep", sleep)
    registry.add("deaf_sleep", deaf_sleep)
    registry.add("fail_n_times", fail_n_times)
    registry.add("write_file", write_file)
    registry.add("cap_memory", cap_memory)
    registry.add("raise_error", raise_error)
    # Sessions with equal params.steps may share a call (a stand-in for inference's full rule).
    registry.add("write_group", write_group, compatibility=lambda config, params: params.steps)
