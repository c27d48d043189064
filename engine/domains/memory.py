"""The memory domain: free and used memory per device, estimates, and out-of-memory handling."""

from __future__ import annotations

import gc

from engine.domains.device import CUDA_API, DeviceInfo, system_memory
from engine.errors import WillNotFit
from engine.run.failures import is_oom  # noqa: F401  (the domains' name for it)

# Rough bytes of activations per latent pixel per image in a UNet pass with classifier-free
# guidance, at 2 bytes per value; measured order of magnitude for SDXL at 1024x1024.
ACTIVATION_BYTES_PER_LATENT_PIXEL = 90_000


def free_memory(device: DeviceInfo) -> int:
    if device.kind in CUDA_API:
        import torch

        free, _ = torch.cuda.mem_get_info(device.index)
        return free
    if device.kind == "xpu":
        import torch

        return torch.xpu.mem_get_info(device.index)[0] if hasattr(torch.xpu, "mem_get_info") else device.free_memory
    return system_memory()[1]


def usage(device: DeviceInfo) -> dict[str, int | None]:
    """What a worker's device holds now, in bytes: `used` (torch's allocated memory on a GPU; the
    process's resident memory on the CPU), `reserved` (torch's cache, GPUs only) and `total`."""
    if device.kind in CUDA_API:
        import torch

        free, total = torch.cuda.mem_get_info(device.index)
        return {"used": int(torch.cuda.memory_allocated(device.index)),
                "reserved": int(torch.cuda.memory_reserved(device.index)), "total": int(total)}
    import psutil

    return {"used": int(psutil.Process().memory_info().rss), "reserved": None, "total": int(system_memory()[0])}


def activation_bytes(width: int, height: int, num_images: int, dtype_bytes: int) -> int:
    latent_pixels = (width // 8) * (height // 8)
    return int(latent_pixels * num_images * ACTIVATION_BYTES_PER_LATENT_PIXEL * dtype_bytes / 2)


def check_fits(required: int, device: DeviceInfo, already_loaded: bool, weights: int) -> None:
    """Refuse before trying when the work cannot fit in what the device has free."""
    needed = required + (0 if already_loaded else weights)
    available = free_memory(device)
    if needed > available:
        raise WillNotFit(
            f"needs about {needed / 2**30:.1f} GiB on {device.id}, {available / 2**30:.1f} GiB free; "
            "lower width, height or num_images"
        )


def call_budget(device: DeviceInfo) -> tuple[int, int] | None:
    """(bytes allocated now, bytes a call could use now: free plus what torch holds unused) on
    CUDA; None where torch does not say."""
    if device.kind not in CUDA_API:
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device.index)
    allocated = torch.cuda.memory_allocated(device.index)
    return allocated, free + torch.cuda.memory_reserved(device.index) - allocated


def free_caches(device: DeviceInfo) -> None:
    gc.collect()
    if device.kind in CUDA_API:
        import torch

        torch.cuda.empty_cache()


def reset_peak(device: DeviceInfo) -> None:
    if device.kind in CUDA_API:
        import torch

        torch.cuda.reset_peak_memory_stats(device.index)


def peak_bytes(device: DeviceInfo) -> int | None:
    if device.kind in CUDA_API:
        import torch

        return int(torch.cuda.max_memory_allocated(device.index))
    return None


def weights_bytes(path) -> int:
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def parameter_counts(path) -> dict[str, int]:
    """The values in a model's safetensors, by part (a diffusers folder's subfolder: transformer,
    text_encoder_2, vae...; "" for a single file), read from the files' headers alone."""
    import math
    from pathlib import Path

    from engine.domains.catalogue import safetensors_header
    from engine.errors import ValidationError

    path = Path(path)
    counts: dict[str, int] = {}
    for file in [path] if path.is_file() else sorted(path.rglob("*.safetensors")):
        inside = file.relative_to(path).parts if file != path else ()
        part = inside[0] if len(inside) > 1 else ""
        try:
            header = safetensors_header(file)
        except (OSError, ValidationError):
            continue
        counts[part] = counts.get(part, 0) + sum(math.prod(t["shape"]) for t in header.values()
                                                 if isinstance(t, dict) and "shape" in t)
    return counts


def pipeline_needs(counts: dict[str, int], value_bytes: int, width: int, height: int) -> tuple[int, int]:
    """(bytes the whole pipeline needs on its device, bytes its largest part needs there) for one
    image of width x height: its weights at `value_bytes` a value, and the call's activations."""
    activations = activation_bytes(width, height, 1, value_bytes)
    return (sum(counts.values()) * value_bytes + activations,
            max(counts.values(), default=0) * value_bytes + activations)


def offload_plan(whole: int, largest: int, available: int, setting: str = "auto") -> str:
    """Where a pipeline's weights live: "none" (all on the device) when the whole fits in what is
    available, else "model" (each part moved to the device while it runs) when its largest part
    fits, else "sequential" (layer by layer: slow, but it runs). "off": always "none"."""
    if setting == "off" or whole <= available:
        return "none"
    return "model" if largest <= available else "sequential"
