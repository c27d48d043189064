"""The device domain: which accelerators exist (DirectML, CUDA, MPS, CPU), and which one a job runs on.

`auto` prefers DirectML (torch_directml), then CUDA, MPS, CPU. On DirectML, seeds are drawn from
CPU generators (torch's RNG does not run there) and fp32 is the default precision.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass
from typing import Any

from engine.errors import DeviceUnavailable
from engine.handlers import StepContext, StepResult

PREFERENCE = ("directml", "cuda", "mps", "cpu")


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    kind: str
    index: int
    name: str
    total_memory: int
    free_memory: int
    fp16: bool
    bf16: bool


def _directml() -> Any | None:
    try:
        module = importlib.import_module("torch_directml")
        return module if module.is_available() else None
    except Exception:  # no package, or its native library cannot load (no D3D12 here)
        return None


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of system memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = total
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, available


def discover() -> list[DeviceInfo]:
    import torch

    found: list[DeviceInfo] = []
    dml = _directml()
    if dml is not None:
        total, free = system_memory()  # DirectML shares no memory query; the adapter's is unknown here
        for index in range(dml.device_count()):
            found.append(DeviceInfo(f"directml:{index}", "directml", index, dml.device_name(index), total, free,
                                    fp16=True, bf16=False))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            props = torch.cuda.get_device_properties(index)
            found.append(DeviceInfo(f"cuda:{index}", "cuda", index, props.name, total, free, fp16=True,
                                    bf16=props.major >= 8))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        total, free = system_memory()
        found.append(DeviceInfo("mps", "mps", 0, "Apple MPS", total, free, fp16=True, bf16=False))
    total, free = system_memory()
    found.append(DeviceInfo("cpu", "cpu", 0, "CPU", total, free, fp16=False, bf16=True))
    return found


def select(preferred: str, devices: list[DeviceInfo] | None = None) -> DeviceInfo:
    """The device for `preferred`: auto, a kind (cuda) or an exact id (cuda:1, directml:0, cpu)."""
    devices = devices if devices is not None else discover()
    preferred = (preferred or "auto").lower()
    if preferred == "auto":
        for kind in PREFERENCE:
            for device in devices:
                if device.kind == kind:
                    return device
    for device in devices:
        if preferred in (device.id, device.kind):
            return device
    raise DeviceUnavailable(f"device {preferred!r} is not available here; found: {', '.join(d.id for d in devices)}")


def torch_device(device: DeviceInfo):
    import torch

    if device.kind == "directml":
        return _directml().device(device.index)
    return torch.device(device.id)


def dtype_for(device: DeviceInfo, configured: str = "auto"):
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if configured != "auto":
        return names[configured]
    return torch.float16 if device.kind == "cuda" else torch.float32


def generator_device(device: DeviceInfo) -> str:
    """Where seeded generators live: CPU for DirectML and MPS (reproducible), else the device."""
    return "cuda" if device.kind == "cuda" else "cpu"


def discovery_step(ctx: StepContext) -> StepResult:
    """device_discovery: choose the device for this session (params.device, else config)."""
    found = discover()
    device = select(ctx.params.get("device") or ctx.config.get("device", "preferred"), found)
    dtype = str(dtype_for(device, ctx.config.get("device", "dtype"))).replace("torch.", "")
    return StepResult(data={"device": device.id, "device_name": device.name, "dtype": dtype,
                            "devices": [asdict(d) for d in found]})


def device_of(ctx: StepContext) -> DeviceInfo:
    """The device an earlier device_discovery step chose (or a fresh choice)."""
    return select(ctx.previous_value("device") or ctx.params.get("device") or ctx.config.get("device", "preferred"))
