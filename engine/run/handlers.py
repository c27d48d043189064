"""Step handlers: the registry keyed by step type, and what a handler is given and returns.

Handlers know nothing of the event store. They take a `StepContext` (typed inputs, a progress
callback, a cancellation token, a folder to write into) and return a `StepResult`. Modules that
provide handlers are named in config.toml (`handlers.modules`); each has `register(registry)`.
The real domains register this way, and so do the test and benchmark handlers.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import Cancelled, EngineError
from engine.params import StepParams
from engine.outbox.folders import make_empty


class CancellationToken:
    """Set by the runner when the session is cancelled or paused, or the lease is lost."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_set(self) -> None:
        if self._event.is_set():
            raise Cancelled(f"interrupted: {self.reason}", reason=self.reason)


@dataclass
class StepContext:
    session_id: str
    run: int
    step_index: int
    step_type: str
    domain: str
    attempt: int
    params: StepParams  # the session's validated, resolved params
    step_config: dict[str, Any]
    previous: list[dict[str, Any]]
    attempt_dir: Path
    inbox: Path
    token: CancellationToken
    progress: Callable[[float, str], None]
    config: Any
    shared: dict[str, Any]
    notify: Callable[[str, dict[str, Any]], None] = lambda kind, data: None
    work_dir_made: bool = False
    # The device of the runner's worker that runs this step (engine.domains.device.DeviceInfo);
    # None outside a worker. Handlers use it, so a worker's steps stay on its device.
    device: Any = None

    @property
    def work_dir(self) -> Path:
        """This attempt's private folder, made empty on first use (steps that write nothing cost nothing)."""
        if not self.work_dir_made:
            make_empty(self.attempt_dir)
            self.work_dir_made = True
        return self.attempt_dir

    def previous_images(self) -> list[Path]:
        """Image files produced by the newest earlier step that produced any."""
        for output in reversed(self.previous):
            images = output.get("images") or []
            if images:
                return [Path(p) for p in images]
        return []

    def previous_value(self, key: str, default: Any = None) -> Any:
        for output in reversed(self.previous):
            if key in output.get("data", {}):
                return output["data"][key]
        return default


@dataclass
class StepResult:
    """What a handler made: files it wrote into work_dir (names) and plain data for result.json."""

    images: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    # Futures of files still being written when the handler returned (its device work done): the
    # runner starts the device's next call meanwhile and records the step once they are written.
    writing: list = field(default_factory=list)

    def wait_for_files(self) -> None:
        """Returns once every file is written or failed (none is left writing); raises the first
        write's error."""
        concurrent.futures.wait(self.writing)
        for future in self.writing:
            future.result()


Handler = Callable[[StepContext], StepResult]


@dataclass(frozen=True)
class SubmitCheck:
    """What a domain's submit-time check is given beside the step and the resolved params: where
    in the job the params are (`params`, `items[3]`), the limits, and the model catalogue."""

    where: str
    limits: dict[str, Any]
    models: Any


# check(step, params, submit): raise ValidationError for a step that could never run.
Check = Callable[[dict, dict, SubmitCheck], None]
# output_size(step, params, (width, height) in, submit) -> the size of the images it makes.
OutputSize = Callable[[dict, dict, tuple, SubmitCheck], tuple]
# params_check(params, submit): a check of params whatever the workflow (a preset name, say).
ParamsCheck = Callable[[dict, SubmitCheck], None]


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._compatibility: dict[str, Callable] = {}
        self._checks: dict[str, Check] = {}
        self._sizes: dict[str, OutputSize] = {}
        self.params_checks: list[ParamsCheck] = []
        self.shared: dict[str, Any] = {}

    def add(self, step_type: str, handler: Handler, compatibility: Callable | None = None,
            check: Check | None = None, output_size: OutputSize | None = None) -> None:
        """Register a handler. With `compatibility(step_config, params)`, the handler serves a group:
        it takes a list of StepContexts and returns one StepResult each, and steps whose
        compatibility values are equal may be handed to it together (see engine.run.grouping).
        `check` and `output_size` are the domain's submit-time checks (engine.ingest.intake runs
        them): a step refused at submit never fails at run time; `output_size` follows an image's
        size through the steps (within limits.max_output_pixels)."""
        self._handlers[step_type] = handler
        for table, value in ((self._compatibility, compatibility), (self._checks, check), (self._sizes, output_size)):
            if value is not None:
                table[step_type] = value

    def add_params_check(self, check: ParamsCheck) -> None:
        """A domain's check of the params of every job, whichever workflow it names."""
        self.params_checks.append(check)

    def compatibility(self, step_type: str) -> Callable | None:
        return self._compatibility.get(step_type)

    def check(self, step_type: str) -> Check | None:
        return self._checks.get(step_type)

    def output_size(self, step_type: str) -> OutputSize | None:
        return self._sizes.get(step_type)

    def serves(self, step_type: str) -> bool:
        return step_type in self._handlers

    def serves_groups(self, step_type: str) -> bool:
        return step_type in self._compatibility

    def for_another_worker(self) -> "Registry":
        """The same handlers with their own shared state (a worker's warm model cache is its own)."""
        other = Registry()
        other._handlers, other._compatibility = self._handlers, self._compatibility
        other._checks, other._sizes, other.params_checks = self._checks, self._sizes, self.params_checks
        return other

    def warm_models(self) -> list[str]:
        """Ids of the models the domains keep warm in this process (none before the first load)."""
        cache = self.shared.get("model_cache")
        return cache.loaded_ids() if cache is not None else []

    def get(self, step_type: str) -> Handler:
        try:
            return self._handlers[step_type]
        except KeyError:
            error = EngineError(f"no handler registered for step type {step_type!r} (see handlers.modules)")
            error.retryable = False  # a configuration gap: trying again cannot help
            raise error from None


def load_registry(modules: list[str]) -> Registry:
    from engine.errors import ValidationError

    registry = Registry()
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValidationError(f"handlers.modules: cannot import {name!r} ({exc})") from exc
        if not hasattr(module, "register"):
            raise ValidationError(f"handlers.modules: {name!r} has no register(registry) function")
        module.register(registry)
    return registry
