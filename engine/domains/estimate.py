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
