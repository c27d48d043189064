"""Rough memory and time estimates for a workflow with given params (`engine workflows ID`)."""

from __future__ import annotations

from typing import Any

from engine.domains import memory
from engine.domains.device import select, torch_dtype_bytes
from engine.errors import EngineError
from engine.domains.catalogue import ModelRegistry

# Seconds per denoising step of one 1024x1024 SDXL-class image, by device kind (order of magnitude);
# every kind discovery knows (device.PREFERENCE) has one.
SECONDS_PER_MEGAPIXEL_STEP = {"cuda": 0.06, "rocm": 0.09, "xpu": 0.2, "directml": 0.25, "mps": 0.5, "cpu": 12.0}


def estimate(config, workflow, params, devices: list | None = None, models: ModelRegistry | None = None) -> dict[str, Any]:
    """`devices`: what to choose the device from (by default, what discovery finds here);
    `models`: the installation's catalogue (by default, the one the config names)."""
    device = select(params.device or config.get("device", "preferred"), devices)
    registry = models or ModelRegistry(config.models_dir, config.get("models", "allow_pickle"))
    weights, model_id, size = 0, None, 1024
    if workflow.generates:
        try:
            entry = registry.get(params.model, "pipeline") if params.model else registry.default_pipeline()
            weights = memory.weights_bytes(entry.location(config.models_dir))
            model_id, size = entry.id, entry.default_size or 1024
        except EngineError:
            pass
    width, height = params.width or size, params.height or size
    dtype_bytes = torch_dtype_bytes(device)
    activations = memory.activation_bytes(width, height, params.num_images, dtype_bytes) if workflow.generates else 0
    megapixels = width * height / 2**20
    seconds = (SECONDS_PER_MEGAPIXEL_STEP[device.kind] * megapixels * params.steps * params.num_images
               if workflow.generates else 0.5 * params.num_images)
    return {"device": device.id, "model": model_id, "width": width, "height": height,
            "memory_bytes": weights + activations, "memory_gib": round((weights + activations) / 2**30, 2),
            "seconds": round(seconds, 1), "note": "rough order of magnitude"}


PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2, "auto": 2}  # fp8: its other layers stay in bf16


def model_needs(entry, config) -> dict[str, float] | None:
    """What a pipeline needs on a GPU for one image of its native size, in GiB, from its files'
    headers: `needs_gib` whole, `least_gib` with its parts offloaded (the largest part at a time).
    None for what is not a pipeline."""
    if entry.kind != "pipeline":
        return None
    from engine.domains import families
    from engine.domains.catalogue import precision_of

    counts = memory.parameter_counts(entry.location(config.models_dir))
    size = entry.default_size or families.family_of(entry.family).native_size
    whole, least = memory.pipeline_needs(counts, PRECISION_BYTES.get(precision_of(entry, config), 2), size, size)
    return {"needs_gib": round(whole / 2**30, 1), "least_gib": round(least / 2**30, 1)}
