"""Resolving a validated job into what a session records: workflow steps and complete params.

Everything a session needs later is fixed here, once: the workflow's steps, the model, the image
size, the seed actually used. Replays and restarts never depend on templates or defaults again.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

from engine.errors import ValidationError
from engine.run.grouping import group_key
from engine.run.handlers import Registry, SubmitCheck
from engine.inputs import InputImage, digest_key, read_image
from engine.ingest.jobs import (MAX_SEED, BatchJob, GenerationParams, SessionJob, StepParams, check_limits,
                                validate_params)
from engine.paths import resolve_inside
from engine.domains import families
from engine.domains.catalogue import ModelEntry, ModelRegistry, describe_family, fits, precision_of
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
        self.check_notify(job.notify)
        workflow = self.workflow(job.workflow)
        params = self.resolve_params(workflow, job.params, "params")
        return ResolvedSession(workflow.id, self.steps(workflow, params), params)

    def check_notify(self, notify) -> None:
        """A webhook needs the signing secret, and may not name an address the deliverer refuses
        (an IP written in the URL is checked now; a name when it is sent)."""
        if notify is None:
            return
        if not self.config.get("notify", "secret"):
            raise ValidationError("notify: [notify] secret is not set, and every delivery is signed with it; "
                                  "`engine notify new-secret` makes one", [{"loc": "notify"}])
        import ipaddress
        from urllib.parse import urlsplit

        from engine.notify.rules import address_refused

        host = urlsplit(notify.url).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return
        why = address_refused(host, bool(self.config.get("notify", "allow_private")))
        if why:
            raise ValidationError(f"notify.url: {why}", [{"loc": "notify.url"}])

    def steps(self, workflow: Workflow, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The workflow's steps for these params; a step whose handler serves groups records its
        compatibility key (`group`)."""
        steps, typed = workflow.resolve(params), StepParams.of(params)
        for step in steps:
            key = group_key(step["type"], step["config"], typed, self.handlers.compatibility(step["type"]))
            if key:
                step["group"] = key
        return steps

    def batch(self, job: BatchJob) -> list[ResolvedSession]:
        self.check_priority(job.priority)
        self.check_notify(job.notify)
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
            self.check_family(workflow, params, data, pipeline, where)
        if params.device:
            self.check_device(params.device, f"{where}.device")
        for index, lora in enumerate(params.loras):
            entry = self.models.get(lora.model, "lora", f"{where}.loras[{index}].model")
            self.check_fits(entry, pipeline, f"{where}.loras[{index}].model")
        if params.loras and pipeline is not None and precision_of(pipeline, self.config) == "fp8":
            raise ValidationError(f"{where}.loras: {pipeline.id!r} runs in float8 (precision fp8), and a LoRA needs its "
                                  "attention layers as they were: register the model again with --precision fp16 or "
                                  "bf16 to use LoRAs", [{"loc": f"{where}.loras"}])
        if params.vae:
            self.models.get(params.vae, "vae", f"{where}.vae")
        if params.controlnet:
            entry = self.models.get(params.controlnet.model, "controlnet", f"{where}.controlnet.model")
            self.check_fits(entry, pipeline, f"{where}.controlnet.model")
            self.check_image(params.controlnet.image, f"{where}.controlnet.image", digests)
        for index, op in enumerate(params.postprocess):
            if getattr(op, "model", None):
                self.models.get(op.model, "upscaler", f"{where}.postprocess[{index}].model")
        for name in ("init_image", "mask_image"):
            if data.get(name):
                inputs[name] = self.check_image(data[name], f"{where}.{name}", digests)
        if digests:
            data["input_digests"] = digests
        start = (data["width"], data["height"]) if workflow.generates else (
            inputs["init_image"].size if "init_image" in inputs else None)
        self.check_steps(workflow.resolve(data), data, start, where)
        if data["seed"] in (None, -1):
            data["seed"] = secrets.randbelow(MAX_SEED + 1)
        return data

    def check_steps(self, steps: list[dict[str, Any]], data: dict[str, Any], start: tuple[int, int] | None,
                    where: str) -> None:
        """Each step's own submit-time check, from its domain through the handler registry; then
        the size of the images through the steps (`start`: the size the first step makes or is
        given), each within the limits: refused here, not out of memory three times at run time."""
        submit, typed = SubmitCheck(where, self.limits, self.models), StepParams.of(data)
        for params_check in self.handlers.params_checks:
            params_check(typed, submit)
        for step in steps:
            check = self.handlers.check(step["type"])
            if check is not None:
                check(step, typed, submit)
        size = start
        for step in steps if start is not None else ():
            output_size = self.handlers.output_size(step["type"])
            if output_size is not None:
                size = output_size(step, typed, size, submit)

    @staticmethod
    def check_family(workflow: Workflow, params: GenerationParams, data: dict[str, Any], pipeline: ModelEntry,
                     where: str) -> None:
        """The model's family fills in the steps and guidance a job leaves out (FLUX.1 schnell: 4
        and none), and refuses what the family cannot run (engine.domains.families.check)."""
        family = families.family_of(pipeline.family)
        steps, guidance, _ = family.defaults(pipeline.variant)
        given = params.model_fields_set
        if "steps" not in given:
            data["steps"] = steps
        if "guidance_scale" not in given:
            data["guidance_scale"] = guidance
        modes = {step["config"].get("mode", "txt2img") for step in workflow.resolve(data)
                 if step["type"] == "inference_generation"}
        typed = params.model_copy(update={name: data[name] for name in ("steps", "guidance_scale", "width", "height")})
        for mode in sorted(modes) or [""]:
            families.check(family, pipeline.variant, typed, set(given), mode, where, pipeline.id)

    def check_size(self, data: dict[str, Any], pipeline: ModelEntry, where: str) -> None:
        """A size left to the model's native one must still be within the limits."""
        low, high = self.limits["min_size"], self.limits["max_size"]
        for name in ("width", "height"):
            if not low <= data[name] <= high:
                raise ValidationError(
                    f"{where}.{name}: {pipeline.id!r} makes {data[name]} by default, outside limits.min_size/max_size "
                    f"({low} to {high}); give width and height", [{"loc": f"{where}.{name}"}])

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
