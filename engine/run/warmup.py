"""`engine warmup`: compile a model's fast path ahead, for the image sizes and call sizes given,
so the first session does not wait for it. Compiles through the same loading and calling code a
runner uses (their caches are this machine's, see engine.domains.accelerate) and records what it
compiled as `model.compiled` events, as a runner would."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

from engine.errors import ValidationError
from engine.params import StepParams
from engine.run.handlers import CancellationToken, StepContext
from engine.run.runner import record_model_notices
from engine.store import Store


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); '1024' -> (1024, 1024)."""
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise ValidationError(f"--sizes: {text!r} is no size (WIDTHxHEIGHT, e.g. 1024x1024)") from None
    if min(size) < 8 or any(v % 8 for v in size):
        raise ValidationError(f"--sizes: {text!r}: width and height must be positive multiples of 8")
    return size


def _context(config, shared: dict, model_id: str, notices: list) -> StepContext:
    return StepContext(
        session_id="warmup", run=1, step_index=0, step_type="warmup", domain="model", attempt=1,
        params=StepParams(model=model_id), step_config={}, previous=[], attempt_dir=config.outbox / ".warmup",
        inbox=config.inbox, token=CancellationToken(), progress=lambda fraction, message="": None, config=config,
        shared=shared, notify=lambda kind, data: notices.append((kind, data)),
    )


def warmup(config, store: Store, shared: dict, model_id: str, sizes: list[tuple[int, int]], batch_sizes: list[int],
           steps: int = 3, on_shape: Callable[[tuple, float, bool], None] = lambda shape, seconds, compiled: None
           ) -> list[dict[str, Any]]:
    """Load the model on the compiled path and make one call of each (batch size, size), so each
    is compiled (and cached). Returns what each call did."""
    import torch

    from engine.domains import accelerate
    from engine.domains.device import CUDA_API
    from engine.domains.inference import Image, generate
    from engine.domains.model import accelerated_or_none, pipeline_for

    notices: list = []
    ctx = _context(config, shared, model_id, notices)
    cached, _, device = pipeline_for(ctx, model_id)
    if cached.accelerated is None:  # the model does not ask for it: warm up is asking
        cached.accelerated = accelerated_or_none(cached.value, config, device, fingerprint=cached.file_hash)
    if cached.accelerated is None:
        raise ValidationError(f"{model_id}: the compiled path cannot run on {device.id}")
    accelerated = replace(cached.accelerated, sizes=sorted(set(batch_sizes) | set(cached.accelerated.sizes)),
                          background=None)  # warming up is compiling in the foreground
    cached.accelerated = accelerated
    pipe, report = cached.value, []
    for width, height in sizes:
        for images in sorted(set(batch_sizes)):
            shape = ("txt2img", images, width, height)
            wanted = [Image(0, "warm up", None, seed) for seed in range(images)]
            params = StepParams(model=model_id, steps=steps, guidance_scale=5.0, width=width, height=height)
            started = time.perf_counter()
            compiled = accelerate.run_call(
                accelerated, pipe, shape,
                lambda: generate(pipe, wanted, params, {"width": width, "height": height}, device, [ctx]),
                ctx.notify, model_id, device.id)
            if device.kind in CUDA_API:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            report.append({"images": images, "width": width, "height": height, "compiled": compiled,
                           "seconds": round(seconds, 3), "error": accelerated.failed.get(shape)})
            on_shape(shape, seconds, compiled)
    record_model_notices(store, "warmup", notices)
    return report
