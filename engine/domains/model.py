"""The model domain: loading registered models and keeping them warm.

A least-recently-used cache keeps pipelines (and upscalers, ControlNets, safety checkers) on their
device between steps and sessions, evicting under a memory budget. Every load and unload is
reported through the step's `notify`, which the runner records as `model.loaded` /
`model.unloaded` events, with the file and its hash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from engine.domains import accelerate, families, float8, memory
from engine.domains.device import CUDA_API, DeviceInfo, device_of, dtype_for, torch_device
from engine.errors import EngineError, ModelLoadFailed
from engine.run.handlers import StepContext, StepResult
from engine.domains.catalogue import (ModelEntry, ModelRegistry, file_sha256, folder_fingerprint, precision_of,
                                      safetensors_keys)

Notify = Callable[[str, dict[str, Any]], None]
log = logging.getLogger("engine.model")

# One load at a time in a process: diffusers and accelerate build models on the "meta" device by
# patching torch for the duration of a load, so two workers loading at once (one per GPU) break
# each other's loads ("Cannot copy out of meta tensor"). Loads are bound by the disk anyway.
LOADING = threading.Lock()


@dataclass
class Cached:
    value: Any
    entry: ModelEntry
    device: str
    size: int
    file_hash: str
    default_scheduler: Any = None
    accelerated: Any = None  # engine.domains.accelerate.Accelerated, for a model on the compiled path
    precision: str = ""  # what model.loaded said: float16, bfloat16, float32, fp8


class ModelCache:
    def __init__(self, budget_bytes: int | None) -> None:
        self.budget = budget_bytes
        self.items: "OrderedDict[tuple, Cached]" = OrderedDict()
        self.lock = threading.RLock()

    def get(self, key: tuple, entry: ModelEntry, device: DeviceInfo, loader: Callable[[], Any], path,
            notify: Notify, precision: str = "") -> tuple[Cached, bool]:
        """The cached object for key, loading it (and evicting others) when missing (the
        `model.loaded` event says its `precision` when given)."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key], False
            size = memory.weights_bytes(path)
            self._make_room(size, device, notify)
            started = time.perf_counter()
            try:
                with LOADING:
                    value = loader()
            except EngineError:
                raise
            except Exception as exc:
                if memory.is_oom(exc):
                    raise
                raise ModelLoadFailed(f"could not load {entry.id!r} from {path}: {type(exc).__name__}: {exc}") from exc
            file_hash = entry.sha256 or (file_sha256(path) if path.is_file() else folder_fingerprint(path))
            cached = Cached(value, entry, device.id, size, file_hash, precision=precision)
            if hasattr(value, "scheduler"):
                cached.default_scheduler = value.scheduler
            self.items[key] = cached
            notify("model.loaded", {"model_id": entry.id, "kind": entry.kind, "device": device.id,
                                    "file": str(path), "file_hash": file_hash, "bytes": size,
                                    "seconds": round(time.perf_counter() - started, 3),
                                    **({"precision": precision} if precision else {})})
            return cached, True

    def _make_room(self, size: int, device: DeviceInfo, notify: Notify) -> None:
        budget = self.budget or int(device.total_memory * 0.8)
        while self.items and sum(c.size for c in self.items.values()) + size > budget:
            key, evicted = self.items.popitem(last=False)
            notify("model.unloaded", {"model_id": evicted.entry.id, "device": evicted.device, "reason": "lru"})
            del evicted
            memory.free_caches(device)

    def loaded_ids(self) -> list[str]:
        return [c.entry.id for c in self.items.values()]


def cache_of(ctx: StepContext) -> ModelCache:
    cache = ctx.shared.get("model_cache")
    if cache is None:
        budget_gib = float(ctx.config.get("models", "cache_budget_gib"))
        cache = ctx.shared.setdefault("model_cache", ModelCache(int(budget_gib * 2**30) if budget_gib > 0 else None))
    return cache


def registry_of(ctx: StepContext) -> ModelRegistry:
    return ModelRegistry(ctx.config.models_dir, ctx.config.get("models", "allow_pickle"))


def _quiet_loading() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def denoiser_of(pipe):
    """A pipeline's denoiser: its UNet, or its transformer (SD3, Flux)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def load_pipeline(entry: ModelEntry, path, device: DeviceInfo, dtype, configs=None, offload: str = "none") -> Any:
    """A registered pipeline on its device; `configs`: the diffusers folder a single file's
    configs and tokenizers come from; `offload` (memory.offload_plan): "model" or "sequential"
    keep its weights on the CPU, moved to the device part by part (or layer by layer) as it runs."""
    from diffusers import DiffusionPipeline

    _quiet_loading()
    if entry.format == "diffusers":
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True,
                                                 local_files_only=True)
    else:
        pipe = _load_single_file(entry, path, dtype, configs)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=torch_device(device))
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=torch_device(device))
    else:
        pipe = pipe.to(torch_device(device))
    pipe.engine_offload = offload
    pipe.set_progress_bar_config(disable=True)
    return pipe


def offload_for(entry: ModelEntry, path, device: DeviceInfo, dtype, setting: str) -> str:
    """How much of this pipeline must stay on the CPU (memory.offload_plan) on a GPU with the free
    memory it has now, for one image of the model's native size; "none" off the GPUs."""
    import torch

    if device.kind not in CUDA_API or setting == "off":
        return "none"
    size = entry.default_size or families.family_of(entry.family).native_size
    whole, largest = memory.pipeline_needs(memory.parameter_counts(path), torch.finfo(dtype).bits // 8, size, size)
    free = memory.free_memory(device)
    plan = memory.offload_plan(whole, largest, free, setting)
    if plan != "none":
        log.warning("%s needs about %.1f GiB on %s, %.1f GiB free: its parts stay on the CPU (%s offload)", entry.id,
                    whole / 2**30, device.id, free / 2**30, plan)
    return plan


def _load_single_file(entry: ModelEntry, path, dtype, configs) -> Any:
    """A single-file checkpoint holds weights only: configs, tokenizers and the scheduler come from
    the diffusers folder it was registered with (offline), or else from the local Hugging Face cache."""
    import diffusers

    family = families.family_of(entry.family)
    cls = getattr(diffusers, family.pipelines["txt2img"])
    if configs is not None and not families.holds_vae(safetensors_keys(path)):
        return _denoiser_file_in_folder(family, cls, path, configs, dtype)
    try:
        return cls.from_single_file(str(path), config=str(configs) if configs else None, torch_dtype=dtype,
                                    local_files_only=True)
    except Exception as exc:
        if configs is not None or memory.is_oom(exc):
            raise
        raise ModelLoadFailed(
            f"could not load the single-file checkpoint {entry.id!r} ({type(exc).__name__}: {exc}); a single file "
            "holds weights only: register it with `engine models add FILE --id ID --configs-from FOLDER`, FOLDER "
            f"a diffusers pipeline folder of the same architecture ({entry.family})") from exc


def _denoiser_file_in_folder(family, cls, path, configs, dtype) -> Any:
    """A denoiser saved alone (FLUX.1's flux1-dev.safetensors, in Black Forest Labs' tensor names or
    diffusers'), run with the text encoders, tokenizers, VAE and scheduler of a diffusers folder."""
    import json

    import diffusers

    _, class_name = json.loads((configs / "model_index.json").read_text())[family.denoiser]
    denoiser = getattr(diffusers, class_name).from_single_file(
        str(path), config=str(configs), subfolder=family.denoiser, torch_dtype=dtype, local_files_only=True)
    return cls.from_pretrained(str(configs), torch_dtype=dtype, local_files_only=True, use_safetensors=True,
                               **{family.denoiser: denoiser})


def pipeline_for(ctx: StepContext, model_id: str) -> tuple[Cached, bool, DeviceInfo]:
    """The session's pipeline on the session's device, from the warm cache when it is there;
    prepared for the compiled path when the model (or the config's default) asks for it. A float8
    pipeline runs in bfloat16 with its attention layers in float8 (bfloat16 alone, said in the log
    when it loads, on a device without float8 matrix units)."""
    device = device_of(ctx)
    entry = registry_of(ctx).get(model_id, "pipeline")
    precision = precision_of(entry, ctx.config)
    why = float8.unsupported(device) if precision == "fp8" else None
    if why:
        precision = "bf16"
    dtype = dtype_for(device, "bf16" if precision == "fp8" else precision, families.family_of(entry.family).half)
    path = entry.location(ctx.config.models_dir)
    configs = entry.configs_location(ctx.config.models_dir)

    scaling = str(ctx.config.get("models", "fp8_scaling")) if precision == "fp8" else None

    def load():
        if why:
            log.warning("%s: float8 needs %s; it runs in bfloat16", model_id, why)
        pipe = load_pipeline(entry, path, device, dtype, configs,
                             offload_for(entry, path, device, dtype, str(ctx.config.get("device", "offload"))))
        if precision == "fp8":
            float8.to_float8(denoiser_of(pipe), scaling)
        return pipe

    cached, loaded = cache_of(ctx).get(("pipeline", model_id, device.id, str(dtype), scaling), entry,
                                       device, load, path, ctx.notify,
                                       precision="fp8" if precision == "fp8" else str(dtype).removeprefix("torch."))
    if loaded and accelerate.wanted(entry.compile, ctx.config):
        cached.accelerated = accelerated_or_none(cached.value, ctx.config, device, model_id, cached.file_hash,
                                                 cached.size)
    return cached, loaded, device


def accelerated_or_none(pipe, config, device: DeviceInfo, model_id: str | None = None, fingerprint: str = "",
                        weights_bytes: int = 0):
    """The compiled path for this pipeline, or None where it cannot run (DirectML, MPS) or could
    not be prepared (logged): the model then runs eagerly, as without the flag. With `model_id`
    and `[compile] background`, a shape not yet compiled is compiled by another process, when the
    device has room for it (accelerate.background_room)."""
    if device.kind in ("directml", "mps"):
        log.warning("the compiled path is for CUDA and CPU devices; %s runs eagerly", device.id)
        return None
    if getattr(pipe, "engine_offload", "none") != "none":
        log.warning("%s is offloaded to the CPU (too large for %s): it runs eagerly", model_id, device.id)
        return None
    try:
        accelerated = accelerate.prepare(pipe, config, device.name, fingerprint)
    except Exception as exc:
        log.warning("could not prepare the compiled path (%s: %s); the model runs eagerly", type(exc).__name__, exc)
        return None
    if model_id is not None and config.get("compile", "background"):
        accelerated.background = accelerate.warmup_elsewhere(config, model_id,
                                                             device.index if device.kind in CUDA_API else None)
        accelerated.free_bytes, accelerated.weights_bytes = (lambda: memory.free_memory(device)), weights_bytes
    return accelerated


def component_for(ctx: StepContext, model_id: str, kind: str, loader: Callable[[ModelEntry, Any], Any]) -> Any:
    """A cached auxiliary model (controlnet, upscaler, safety checker) on the session's device."""
    device = device_of(ctx)
    entry = registry_of(ctx).get(model_id, kind)
    path = entry.location(ctx.config.models_dir)
    cached, _ = cache_of(ctx).get((kind, model_id, device.id), entry, device, lambda: loader(entry, path), path,
                                  ctx.notify)
    return cached.value


def loading_step(ctx: StepContext) -> StepResult:
    """model_loading: make sure the session's pipeline is on its device (a no-op when warm)."""
    started = time.perf_counter()
    cached, loaded, device = pipeline_for(ctx, ctx.params.model)
    return StepResult(data={"model": cached.entry.id, "file_hash": cached.file_hash, "loaded": loaded,
                            "device": device.id, "seconds": round(time.perf_counter() - started, 3),
                            "warm_models": cache_of(ctx).loaded_ids()})
