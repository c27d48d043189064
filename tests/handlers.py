"""Handlers for tests and benchmarks (no-op, sleep, fail-N-times, write-a-file), registered
through the same `handlers.modules` mechanism the real domains use."""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.errors import StepFailed
from engine.handlers import Registry, StepContext, StepResult


def noop(ctx: StepContext) -> StepResult:
    return StepResult()


def sleep(ctx: StepContext) -> StepResult:
    """Sleeps `config.seconds` (or params.steps / 10), polling the token like a denoise loop."""
    seconds = float(ctx.step_config.get("seconds", ctx.params.get("steps", 1) / 10))
    ticks = max(1, int(seconds / 0.02))
    for tick in range(ticks):
        ctx.token.raise_if_set()
        time.sleep(seconds / ticks)
        ctx.progress((tick + 1) / ticks, f"tick {tick + 1}/{ticks}")
    return StepResult(data={"slept": seconds})


def fail_n_times(ctx: StepContext) -> StepResult:
    """Fails its first `config.failures` attempts (params.seed % 10 when absent), then succeeds."""
    failures = int(ctx.step_config.get("failures", ctx.params.get("seed", 0) % 10))
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


def register(registry: Registry) -> None:
    registry.add("noop", noop)
    registry.add("sleep", sleep)
    registry.add("fail_n_times", fail_n_times)
    registry.add("write_file", write_file)
