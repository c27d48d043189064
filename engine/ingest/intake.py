"""Resolving a validated job into what a session records: workflow steps and complete params.

Everything a session needs later is fixed here, once: the workflow's steps, the model, the image
size, the seed actually used. Replays and restarts never depend on templates or defaults again.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any

from engine.errors import ValidationError
from engine.run.grouping import group_key
from engine.run.handlers import Registry
from engine.ingest.inputs import InputImage, digest_key, read_image
from engine.ingest.jobs import MAX_SEED, BatchJob, GenerationParams, SessionJob, check_limits, validate_params
from engine.paths import resolve_inside
from engine.domains.catalogue import ModelEntry, ModelRegistry, describe_family, fits
from engine.workflows import Workflow, get_workflow, load_workflows

log = logging.getLogger("engine.intake")


def served_workflows(workflows: dict[str, Workflow], handlers) -> tuple[dict[str, Workflow], dict[str, str]]:
    """The templates whose every step type has a handler, and why each other one is refused
    (logged once here, when templates load, instead of failing at its first run)."""
    served, refused = {}, {}
    for workflow_id, workflow in workflows.items():
        missing = sorted({step.type for step in workflow.steps if not handlers.serves(step.type)})
        if missing:
            refused[workflow_id] = (f"template {workflow_id!r} was refused when templates loaded: no handler serves "
                                    f"step type {', '.join(map(repr, missing))} (see handlers.modules)")
            log.warning("%s", refused[workflow_id])
        else:
            served[workflow_id] = workflow
    return served, refused


@dataclass
class ResolvedSession:
    workflow_id: str
    steps: list[dict[str, Any]]
    params: dict[str, Any]


class Intake:
    """What validation needs to know: limits, workflows, models, and the inbox for images."""

    def __init__(self, config, store, handlers: Registry, models: ModelRegistry) -> None:
        """`store`: where runners register; a device one of them offers is accepted though this
        machine lacks it (a job for another host's GPU). Built by engine.app.Engine."""
        self.config = config
        self.store = store
        self.limits = config.values["limits"]
        self.inbox = config.inbox
        self.models = models
        self.handlers = handlers
        self.workflows, self.refused = served_workflows(load_workflows(config.workflows_dir), self.handlers)
        self._devices: list | None = None
        self._images: dict[str, InputImage] | None = None  # input images read while a batch is resolved

    def workflow(self, workflow_id: str) -> Workflow:
        if workflow_id in self.refused:
            raise ValidationError(f"workflow: {self.refused[workflow_id]}", [{"loc": "workflow"}])
        return get_workflow(self.workflows, workflow_id)

    def check_priority(self, priority: int) -> None:
        limit = self.limits["max_priority"]
        if priority > limit:
            raise ValidationError(f"priority: {priority} is above limits.max_priority ({limit}); use 0 to {limit}",
                                  [{"loc": "priority"}])

    def session(self, job: SessionJob) -> ResolvedSession:
        self.check_priority(job.priority)
        workflow = self.workflow(job.workflow)
        params = self.resolve_params(workflow, job.params, "params")
        return ResolvedSession(workflow.id, self.steps(workflow, params), params)

    def steps(self, workflow: Workflow, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The workflow's steps for these params; a step whose handler serves groups records its
        compatibility key (`group`)."""
        steps = workflow.resolve(params)
        for step in steps:
            key = group_key(step["type"], step["config"], params, self.handlers.compatibility(step["type"]))
            if key:
                step["group"] = key
        return steps

    def batch(self, job: BatchJob) -> list[ResolvedSession]:
        self.check_priority(job.priority)
        workflow = self.workflow(job.workflow)
        max_items = self.config.get("inbox", "max_batch_items")
        if len(job.items) > max_items:
            raise ValidationError(f"items: {len(job.items)} items, at most {max_items} allowed", [{"loc": "items"}])
        self._images = {}  # the items of one batch often share an input image: decoded once
        try:
            return [self._item(job, workflow, index, overrides) for index, overrides in enumerate(job.expanded(max_items))]
        finally:
            self._images = None

    def _item(self, job: BatchJob, workflow: Workflow, index: int, overrides: Any) -> ResolvedSession:
        if not isinstance(overrides, dict):
            raise ValidationError(f"items[{index}]: must be an object of params", [{"loc": f"items[{index}]"}])
        merged = {**job.params, **overrides}
        base_seed = job.params.get("seed")
        if "seed" not in overrides and base_seed not in (None, -1):
            merged["seed"] = (int(base_seed) + index) % (MAX_SEED + 1)
        where = f"items[{index}]"
        params = self.resolve_params(workflow, validate_params(merged, where, self.limits), where)
        return ResolvedSession(workflow.id, self.steps(workflow, params), params)

    def resolve_params(self, workflow: Workflow, params: GenerationParams, where: str) -> dict[str, Any]:
        check_limits(params, self.limits, where)
        data = params.model_dump()
        for name in workflow.requires:
            if not data.get(name):
                raise ValidationError(f"{where}.{name}: the {workflow.id} workflow needs it", [{"loc": f"{where}.{name}"}])
        pipeline = None
        digests: dict[str, str] = {}  # sha256 of each input image, for the step to know it again
        inputs: dict[str, InputImage] = {}
        if workflow.generates:
            pipeline = (self.models.get(params.model, "pipeline", f"{where}.model") if params.model
                        else self.models.default_pipeline())
            data["model"] = pipeline.id
            native = pipeline.default_size or 1024
            data["width"] = data["width"] or native
            data["height"] = data["height"] or native
            self.check_size(data, pipeline, where)
        if params.device:
            self.check_device(params.device, f"{where}.device")
        for index, lora in enumerate(params.loras):
            entry = self.models.get(lora.model, "lora", f"{where}.loras[{index}].model")
            self.check_fits(entry, pipeline, f"{where}.loras[{index}].model")
        if params.vae:
            self.models.get(params.vae, "vae", f"{where}.vae")
        if any(step.config.get("mode") == "hires" for step in workflow.steps):
            self.check_hires(data, where)
        if params.controlnet:
            entry = self.models.get(params.controlnet.model, "controlnet", f"{where}.controlnet.model")
            self.check_fits(entry, pipeline, f"{where}.controlnet.model")
            self.check_image(params.controlnet.image, f"{where}.controlnet.image", digests)
        for index, op in enumerate(params.postprocess):
            if getattr(op, "model", None):
                self.models.get(op.model, "upscaler", f"{where}.postprocess[{index}].model")
            if getattr(op, "preset", None):
                self.check_preset(op.preset, f"{where}.postprocess[{index}].preset")
        for name in ("init_image", "mask_image"):
            if data.get(name):
                inputs[name] = self.check_image(data[name], f"{where}.{name}", digests)
        if digests:
            data["input_digests"] = digests
        self.check_denoising(workflow, data, where)
        start = (data["width"], data["height"]) if workflow.generates else (
            inputs["init_image"].size if "init_image" in inputs else None)
        if start is not None:
            self.check_output_pixels(workflow.resolve(data), data, start, where)
        if data["seed"] in (None, -1):
            data["seed"] = secrets.randbelow(MAX_SEED + 1)
        return data

    @staticmethod
    def check_denoising(workflow: Workflow, data: dict[str, Any], where: str) -> None:
        """An image-to-image pass denoises int(steps x strength) steps: never zero (diffusers would
        fail at run time); the hires pass runs exactly hires_steps, on a schedule it must have."""
        from engine.domains.inference import MAX_SCHEDULE, denoising_steps, hires_schedule

        modes = {step.config.get("mode") for step in workflow.steps}
        if modes & {"img2img", "inpaint"} and denoising_steps(data["steps"], data["strength"]) < 1:
            least = math.ceil(1000 / data["steps"]) / 1000
            more = f" or at least {math.ceil(1 / data['strength'])} steps" if data["strength"] > 0 else ""
            raise ValidationError(
                f"{where}.strength: {data['steps']} steps at strength {data['strength']} denoise "
                f"int({data['steps']} x {data['strength']}) = 0 steps; give strength at least {least:g}{more}",
                [{"loc": f"{where}.strength"}])
        if "hires" in modes:
            steps = data.get("hires_steps") or data["steps"]
            if hires_schedule(steps, data["hires_strength"]) > MAX_SCHEDULE:
                raise ValidationError(
                    f"{where}.hires_strength: {steps} hires steps at strength {data['hires_strength']} need a schedule of "
                    f"{hires_schedule(steps, data['hires_strength'])} steps, more than the {MAX_SCHEDULE} a scheduler has; "
                    "raise hires_strength or lower hires_steps", [{"loc": f"{where}.hires_strength"}])

    def check_output_pixels(self, steps: list[dict[str, Any]], data: dict[str, Any], size: tuple[int, int],
                            where: str) -> None:
        """Every image the steps would make, through the whole postprocess chain, within
        limits.max_output_pixels: refused here, not out of memory three times at run time."""
        from engine.domains.inference import hires_size
        from engine.domains.postprocessing import check_output_pixels, step_ops, upscaled_size

        limit = self.limits["max_output_pixels"]
        given = data.get("postprocess") or []
        for step in steps:
            if step["config"].get("mode") == "hires":
                size = hires_size(data)
            if step["domain"] != "postprocessing":
                continue
            for op in step_ops(step["config"], data):
                if op["op"] != "upscale":
                    continue
                size = upscaled_size(size, op.get("scale"))
                if step["config"].get("ops_from") == "hires":
                    field = f"{where}.hires_scale"
                elif op in given:
                    field = f"{where}.postprocess[{given.index(op)}].scale"
                else:
                    field = f"{where}.init_image"
                check_output_pixels(size, limit, field)

    def check_size(self, data: dict[str, Any], pipeline: ModelEntry, where: str) -> None:
        """A size left to the model's native one must still be within the limits."""
        low, high = self.limits["min_size"], self.limits["max_size"]
        for name in ("width", "height"):
            if not low <= data[name] <= high:
                raise ValidationError(
                    f"{where}.{name}: {pipeline.id!r} makes {data[name]} by default, outside limits.min_size/max_size "
                    f"({low} to {high}); give width and height", [{"loc": f"{where}.{name}"}])

    def check_hires(self, data: dict[str, Any], where: str) -> None:
        """The hires fix's upscaler exists and its second pass fits the size limits."""
        if data.get("hires_upscaler"):
            self.models.get(data["hires_upscaler"], "upscaler", f"{where}.hires_upscaler")
        from engine.domains.inference import hires_size

        width, height = hires_size(data)
        if max(width, height) > self.limits["max_size"]:
            raise ValidationError(
                f"{where}.hires_scale: the second pass would be {width}x{height}, over limits.max_size "
                f"({self.limits['max_size']}); lower hires_scale, width or height", [{"loc": f"{where}.hires_scale"}])

    def check_device(self, wanted: str, field: str) -> None:
        """A device named in a job must exist on this machine or be offered by a runner registered
        with the store (it may be down now: the session then waits, saying why); else the job
        could never run."""
        from engine.run.affinity import offers, pin_of
        from engine.domains.device import discover, select
        from engine.errors import DeviceUnavailable

        if self._devices is None:
            self._devices = discover()
        try:
            select(wanted, self._devices)
            return
        except DeviceUnavailable:
            pass
        registered = self._registered_workers()
        if offers(pin_of({"device": wanted}), registered):
            return
        found = ", ".join(d.id for d in self._devices)
        elsewhere = f"; runners offer: {', '.join(sorted(set(registered)))}" if registered else ""
        raise ValidationError(f"{field}: no device {wanted!r} on this machine (found: {found}{elsewhere}) nor in any "
                              "runner's [runner] devices; leave it out to use any", [{"loc": field}])

    def _registered_workers(self) -> list[str]:
        if self.store is None:
            return []
        from engine.run.fleet import worker_names

        with self.store.read() as conn:
            return worker_names(conn, live_only=False)

    @staticmethod
    def check_preset(preset: str, field: str) -> None:
        from engine.domains.postprocessing import PRESETS

        if preset not in PRESETS:
            raise ValidationError(f"{field}: unknown enhance preset {preset!r}; known: {', '.join(PRESETS)}",
                                  [{"loc": field}])

    @staticmethod
    def check_fits(adapter: ModelEntry, pipeline: ModelEntry | None, field: str) -> None:
        """A LoRA or ControlNet must be made for the pipeline's family: refused here, not at run time."""
        if pipeline is not None and not fits(adapter, pipeline):
            raise ValidationError(
                f"{field}: {adapter.kind} {adapter.id!r} is for {describe_family(adapter)} models, but model "
                f"{pipeline.id!r} is {describe_family(pipeline)}; use a {adapter.kind} made for {pipeline.family or 'it'}",
                [{"loc": field}])

    def check_image(self, relative: str, field: str, digests: dict[str, str]) -> InputImage:
        """An input image: inside the inbox, within the pixel limit, decoded whole; its digest is
        recorded in `digests`, for the step to know the very file again."""
        path = resolve_inside(self.inbox, relative, field)
        key = str(path)
        found = self._images.get(key) if self._images is not None else None
        if found is None:
            found = read_image(path, field, self.limits["max_image_pixels"])
            if self._images is not None:
                self._images[key] = found
        digests[digest_key(field)] = found.digest
        return found
