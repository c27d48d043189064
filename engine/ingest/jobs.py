"""Job files: key normalisation, the pydantic models of the contract, and their JSON Schema.

Validation happens in two passes: the models hold what never changes (types, shapes, static
bounds, and so the published JSON Schema); `check_limits` applies the limits of config.toml.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from engine.errors import ValidationError
from engine.params import (MAX_SEED, SCHEDULERS, ControlNetParams, EnhanceOp, GenerationParams,  # noqa: F401
                           LoraParams, PostprocessOp, SafetyCheckOp, StepParams, Strict, UpscaleOp)

ACTIONS = ("pause", "resume", "cancel", "restart", "delete", "priority")



JOB_ID = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$")
OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"
OWNER = Field(None, pattern=OWNER_PATTERN, description='who the job is for (fair share and limits); "default" when absent')
DEFAULT_OWNER = "default"
NOTIFIABLE = ("session.started", "session.completed", "session.failed", "session.cancelled", "session.paused",
              "session.resumed", "session.restarted", "batch.started", "batch.completed", "batch.failed",
              "batch.cancelled", "batch.paused", "batch.resumed", "batch.restarted", "item.completed", "item.failed",
              "item.cancelled")


class Notify(Strict):
    """Where to send a job's events (Standard Webhooks: signed with [notify] secret), and which."""

    url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://[^\s/?#]+[^\s]*$",
                     description="an http or https URL")
    events: list[Literal[NOTIFIABLE]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["session.completed", "session.failed", "session.cancelled", "batch.completed",
                                 "batch.failed", "batch.cancelled"], min_length=1, max_length=len(NOTIFIABLE))


class SessionJob(Strict):
    kind: Literal["session"] = "session"
    job_id: str | None = JOB_ID
    owner: str | None = OWNER
    workflow: str = Field("txt2img", min_length=1, max_length=128)
    priority: int = Field(5, ge=0, le=1000)
    hold: bool = False
    params: GenerationParams = Field(default_factory=GenerationParams)
    notify: Notify | None = Field(None, description="webhook: a URL and the events to send it")


class BatchConfig(Strict):
    preferred_batch_size: int = Field(1, ge=1, le=64)
    max_batch_size: int = Field(8, ge=1, le=64)
    dynamic_sizing: bool = True
    memory_threshold: float = Field(0.8, gt=0.0, le=1.0)
    parallel: bool = False
    max_parallel_batches: int = Field(2, ge=1, le=64)


class Matrix(Strict):
    """Params expanded into items: `product` lists are crossed (prompts x seeds), `zip` lists are
    taken together, position by position (they must be of equal length); both together cross the
    zipped rows with the product."""

    product: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)


class BatchJob(Strict):
    kind: Literal["batch"]
    job_id: str | None = JOB_ID
    owner: str | None = OWNER
    name: str = Field("", max_length=256, description="a label to show (any text, not an id; the notes' Name)")
    workflow: str = Field("txt2img", min_length=1, max_length=128)
    priority: int = Field(5, ge=0, le=1000)
    hold: bool = False
    params: dict[str, Any] = Field(default_factory=dict, description="shared params; each item overrides")
    items: list[dict[str, Any]] = Field(default_factory=list, max_length=1_000_000)
    matrix: Matrix | None = Field(None, description="params expanded into items (crossed with items, if any)")
    batch: BatchConfig = Field(default_factory=BatchConfig)
    notify: Notify | None = Field(None, description="webhook: a URL and the batch events (item.* too) to send it")

    def expanded(self, max_items: int) -> list[dict[str, Any]]:
        """Every item's overrides: `items` (or one empty item) crossed with the matrix's rows."""
        rows: list[dict[str, Any]] = [{}]
        check_param_keys(self.params, "params")
        if self.matrix is not None:
            check_param_keys(self.matrix.product, "matrix.product")
            check_param_keys(self.matrix.zip, "matrix.zip")
            lengths = {len(values) for values in self.matrix.zip.values()}
            if len(lengths) > 1:
                raise ValidationError(f"matrix.zip: the lists differ in length ({sorted(lengths)}); zip needs equal ones",
                                      [{"loc": "matrix.zip"}])
            count = (lengths.pop() if lengths else 1) * max(1, len(self.items))
            for values in self.matrix.product.values():
                count *= len(values)
            if count == 0:
                empty = next(f"matrix.{part}.{key}" for part in ("zip", "product")
                             for key, values in getattr(self.matrix, part).items() if not values)
                raise ValidationError(f"{empty}: an empty list expands to no items; a batch needs at least one",
                                      [{"loc": empty}])
            if count > max_items:
                raise ValidationError(f"matrix: expands to {count} items, at most {max_items} allowed",
                                      [{"loc": "matrix"}])
            if self.matrix.zip:
                keys = list(self.matrix.zip)
                rows = [dict(zip(keys, values)) for values in zip(*self.matrix.zip.values())]
            for key, values in self.matrix.product.items():
                rows = [{**row, key: value} for row in rows for value in values]
        elif not self.items:
            raise ValidationError("items: a batch needs items or a matrix", [{"loc": "items"}])
        return [{**item, **row} for item in (self.items or [{}]) for row in rows]


class ControlJob(Strict):
    kind: Literal["control"]
    job_id: str | None = JOB_ID
    target: str = Field(min_length=1, max_length=256)
    action: Literal[ACTIONS]  # type: ignore[valid-type]
    priority: int | None = Field(default=None, ge=0, le=1000, description='the new priority, with action "priority"')

    @model_validator(mode="after")
    def _priority_with_its_action(self) -> "ControlJob":
        if self.action == "priority" and self.priority is None:
            raise ValidationError('priority: action "priority" needs the new value (0 to 1000)', [{"loc": "priority"}])
        if self.action != "priority" and self.priority is not None:
            raise ValidationError(f'priority: goes with action "priority", not {self.action!r}', [{"loc": "priority"}])
        return self


Job = Annotated[Union[SessionJob, BatchJob, ControlJob], Field(discriminator="kind")]


class JobFile(BaseModel):
    """The root of a job file: one of the three kinds, told apart by `kind`."""

    job: Job

    @field_validator("job", mode="before")
    @classmethod
    def _default_kind(cls, value: Any) -> Any:
        if isinstance(value, dict) and "kind" not in value:
            return {**value, "kind": "session"}
        return value


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Words written with inner capitals that are one word: LoRAs -> loras, ControlNet -> controlnet.
_WORDS = re.compile(r"LoRA|ControlNet|CFG|VAE", re.IGNORECASE)

# Documented aliases (docs/jobs.md's table): the design notes' C# clients and AUTOMATIC1111's API.
ALIASES = {
    "cfg_scale": "guidance_scale", "cfg": "guidance_scale",
    "denoising_strength": "strength",
    "sampler_name": "scheduler", "sampler": "scheduler",
    "batch_size": "num_images",
    "negative": "negative_prompt",
    "init_images": "init_image",
    "mask": "mask_image",
    "hr_scale": "hires_scale", "hr_second_pass_steps": "hires_steps", "hr_upscaler": "hires_upscaler",
}
# AUTOMATIC1111's sampler names -> the scheduler names here.
SAMPLER_NAMES = {
    "euler a": "euler_a", "euler": "euler", "ddim": "ddim", "pndm": "pndm", "plms": "pndm", "lms": "lms",
    "heun": "heun", "unipc": "unipc", "dpm++ 2m": "dpm++2m", "dpm++ 2m karras": "dpm++2m_karras",
    "dpm++ sde": "dpm++sde", "dpm++ 2m sde": "dpm++sde",
}


def snake_case(key: str) -> str:
    key = _WORDS.sub(lambda m: m.group(0).capitalize(), key)
    return _CAMEL.sub("_", key).replace("-", "_").lower()


def contract_key(key: str) -> str:
    """The contract's name for a key as a client wrote it (any case; documented aliases)."""
    snake = snake_case(key)
    return ALIASES.get(snake, snake)


def _a1111_values(result: dict[str, Any]) -> dict[str, Any]:
    """AUTOMATIC1111's ways of saying things: n_iter batches of batch_size images, sampler names
    such as "DPM++ 2M Karras", init_images as a list of one."""
    if "n_iter" in result:
        n_iter = result.pop("n_iter")
        if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
            raise ValidationError("n_iter: a whole number of at least 1", [{"loc": "n_iter"}])
        images = result.get("num_images", 1)
        result["num_images"] = images * n_iter if isinstance(images, int) else images
    scheduler = result.get("scheduler")
    if isinstance(scheduler, str) and scheduler.strip().lower() in SAMPLER_NAMES:
        result["scheduler"] = SAMPLER_NAMES[scheduler.strip().lower()]
    if isinstance(result.get("init_image"), list) and len(result["init_image"]) == 1:
        result["init_image"] = result["init_image"][0]
    return result


def normalise_keys(value: Any, path: str = "") -> Any:
    """The contract's key for every key (camelCase and PascalCase clients drop their objects as
    they are; documented aliases such as CfgScale and sampler_name are taken)."""
    if isinstance(value, dict):
        result: dict[str, Any] = {}
        for key, inner in value.items():
            if not isinstance(key, str):
                raise ValidationError("keys must be strings", [{"loc": path or "$"}])
            new_key = contract_key(key)
            where = f"{path}.{new_key}" if path else new_key
            if new_key in result:
                raise ValidationError(f"{where}: given twice (as {key!r} and another spelling)", [{"loc": where}])
            result[new_key] = normalise_keys(inner, where)
        return _a1111_values(result)
    if isinstance(value, list):
        return [normalise_keys(inner, f"{path}[{i}]") for i, inner in enumerate(value)]
    return value


CASES = ("snake", "camel", "pascal")


def to_case(value: Any, case: str) -> Any:
    """snake_case keys as camelCase or PascalCase, for clients in other languages (the design
    notes' ToCSharpFormat); "snake" leaves them."""
    if case == "snake":
        return value
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            joined = "".join(w[:1].upper() + w[1:] for w in str(key).split("_") if w) or str(key)
            out[joined if case == "pascal" else joined[:1].lower() + joined[1:]] = to_case(inner, case)
        return out
    if isinstance(value, list):
        return [to_case(inner, case) for inner in value]
    return value


def _loc(parts: tuple, prefix: str = "") -> str:
    out = prefix
    for index, part in enumerate(parts):
        if part in ("job", "session", "batch", "control") and index < 2:
            continue
        if part in ("upscale", "enhance", "safety_check") and index and isinstance(parts[index - 1], int):
            continue  # the op's tag, after its index
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "$"


# A union's member named by its tag in an error's location.
_TAGS: dict[str, type[BaseModel]] = {"session": SessionJob, "batch": BatchJob, "control": ControlJob,
                                     "upscale": UpscaleOp, "enhance": EnhanceOp, "safety_check": SafetyCheckOp}
# Keys people write for another key of the same object: named in the hint, never taken.
_MEANT = {BatchJob: {"config": "batch", "configuration": "batch", "batch_config": "batch"}}
# Fields whose bounds config.toml narrows: (the limits key of the lowest value, of the highest).
LIMITED = {"steps": (None, "max_steps"), "hires_steps": (None, "max_steps"), "num_images": (None, "max_num_images"),
           "width": ("min_size", "max_size"), "height": ("min_size", "max_size"), "priority": (None, "max_priority")}


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The one model a field holds (directly, in a list, or optionally); None for a union of several."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for m in map(_inner_model, typing.get_args(annotation)) if m is not None}
    return found.pop() if len(found) == 1 else None


def _model_at(root: type[BaseModel] | None, parts: tuple) -> type[BaseModel] | None:
    """The model that holds the last key of an error's location."""
    model = root
    for part in parts[:-1]:
        if isinstance(part, int):
            continue
        if part in _TAGS and (model is None or part not in model.model_fields):
            model = _TAGS[part]
        elif model is not None and part in model.model_fields:
            model = _inner_model(model.model_fields[part].annotation)
        else:
            return None
    return model


def did_you_mean(key: str, model: type[BaseModel] | None) -> str:
    """"; did you mean 'x'?" for the key of this model (or any model) nearest an unknown one."""
    meant = _MEANT.get(model, {}).get(key) if model else None
    if meant:
        return f"; did you mean {meant!r}?"
    models = [model] if model else [GenerationParams, SessionJob, BatchJob, ControlJob]
    known = sorted({name for m in models for name in m.model_fields} | (set(ALIASES) if GenerationParams in models else set()))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # a misspelt first word: guidence -> guidance_scale
        close = difflib.get_close_matches(key, [k.split("_")[0] for k in known], n=1, cutoff=0.75)
        close = [k for k in known if close and k.split("_")[0] == close[0]][:1]
    if not close:
        return ""
    best = ALIASES.get(close[0], close[0])
    return f"; did you mean {best!r}?"


def _message(error: dict, root: type[BaseModel] | None, limits: dict[str, Any] | None) -> str:
    """pydantic's message; "did you mean" for an unknown key; config.toml's bound where it is narrower."""
    loc = error["loc"]
    name = loc[-1] if loc and isinstance(loc[-1], str) else None
    if error["type"] == "extra_forbidden" and name:
        return f"unknown key{did_you_mean(name, _model_at(root, loc))} (docs/jobs.md lists every key; `engine schema` prints them)"
    if limits and name in LIMITED and error["type"] in ("less_than_equal", "greater_than_equal", "less_than",
                                                         "greater_than"):
        low, high = LIMITED[name]
        if low:
            return f"must be between {limits[low]} and {limits[high]} (limits.{low}, limits.{high})"
        if error["type"].startswith("less"):
            return f"must be at most {limits[high]} (limits.{high})"
    return error["msg"]


def pydantic_failure(exc: PydanticValidationError, prefix: str = "", root: type[BaseModel] | None = None,
                     limits: dict[str, Any] | None = None) -> ValidationError:
    details = [
        {"loc": _loc(e["loc"], prefix), "message": _message(e, root, limits), "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return ValidationError(f"{first['loc']}: {first['message']}{more}", details)


def parse_job_bytes(raw: bytes, limits: dict[str, Any] | None = None) -> SessionJob | BatchJob | ControlJob:
    """Decode, normalise and validate a job file's bytes; ValidationError says what is wrong
    (with config.toml's `limits` where they are narrower than the schema's)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"the file is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    if not text.strip():
        raise ValidationError("the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise ValidationError("the JSON is nested too deeply") from exc
    except ValueError as exc:  # an integer literal longer than Python converts, and the like
        raise ValidationError(f"not valid JSON: {exc}") from exc
    return parse_job(data, limits)


def parse_job(data: Any, limits: dict[str, Any] | None = None) -> SessionJob | BatchJob | ControlJob:
    if not isinstance(data, dict):
        raise ValidationError(f"a job file holds one JSON object, not {type(data).__name__}")
    try:
        data = normalise_keys(data)
    except RecursionError as exc:
        raise ValidationError("the JSON is nested too deeply") from exc
    try:
        return JobFile.model_validate({"job": data}).job
    except PydanticValidationError as exc:
        raise pydantic_failure(exc, root=JobFile, limits=limits) from exc
    except RecursionError as exc:
        raise ValidationError("the JSON is nested too deeply") from exc


def validate_params(data: Any, where: str, limits: dict[str, Any] | None = None) -> GenerationParams:
    """Params as a client gave them (any case, aliases), checked against the contract."""
    if not isinstance(data, dict):
        raise ValidationError(f"{where}: a JSON object of params, not {type(data).__name__}", [{"loc": where}])
    try:
        return GenerationParams.model_validate(normalise_keys(data, where))
    except PydanticValidationError as exc:
        raise pydantic_failure(exc, where, GenerationParams, limits) from exc


def check_param_keys(keys, where: str) -> None:
    """Each key names a generation param (the shared params and matrix of a batch, whose typos
    would otherwise be reported at the first item they reach)."""
    for key in keys:
        if key not in GenerationParams.model_fields:
            raise ValidationError(f"{where}.{key}: unknown key{did_you_mean(key, GenerationParams)} "
                                  "(docs/jobs.md lists every key; `engine schema` prints them)", [{"loc": f"{where}.{key}"}])


def check_limits(params: GenerationParams, limits: dict[str, Any], where: str = "params") -> None:
    """The limits of config.toml that the static schema cannot know."""
    problems = []
    for name in ("width", "height"):
        value = getattr(params, name)
        if value is not None and not limits["min_size"] <= value <= limits["max_size"]:
            problems.append((f"{where}.{name}", f"must be between {limits['min_size']} and {limits['max_size']}"))
    if params.steps > limits["max_steps"]:
        problems.append((f"{where}.steps", f"must be at most {limits['max_steps']} (limits.max_steps)"))
    if params.hires_steps is not None and params.hires_steps > limits["max_steps"]:
        problems.append((f"{where}.hires_steps", f"must be at most {limits['max_steps']} (limits.max_steps)"))
    if params.num_images > limits["max_num_images"]:
        problems.append((f"{where}.num_images", f"must be at most {limits['max_num_images']} (limits.max_num_images)"))
    if problems:
        loc, message = problems[0]
        raise ValidationError(f"{loc}: {message}", [{"loc": loc, "message": m} for loc, m in problems])


def job_schema() -> dict[str, Any]:
    """The JSON Schema of job files (snake_case keys; camelCase and PascalCase are accepted too)."""
    schema = JobFile.model_json_schema(mode="validation")
    job = schema["properties"]["job"]
    return {
        **job,
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "engine job file",
        "description": "A file dropped into inbox/. Keys may also be written in camelCase or PascalCase.",
        "$defs": schema.get("$defs", {}),
    }
