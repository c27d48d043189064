"""The device domain: which accelerators exist (DirectML, CUDA, ROCm, Intel XPU, MPS, CPU), and
which one a job runs on.

`auto` prefers DirectML (torch_directml), then CUDA, ROCm (torch's CUDA API on a HIP build: ids
`cuda:N`, kind `rocm`), XPU (`torch.xpu`, Intel GPUs), MPS, CPU. On DirectML, seeds are drawn from
CPU generators (torch's RNG does not run there) and fp32 is the default precision. System memory
comes from psutil, so discovery runs on Windows too.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any

from engine.errors import DeviceUnavailable
from engine.run.handlers import StepContext, StepResult

PREFERENCE = ("directml", "cuda", "rocm", "xpu", "mps", "cpu")
CUDA_API = ("cuda", "rocm")  # devices torch reaches as "cuda:N"


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
    """(total, available) bytes of system memory, on any operating system."""
    import psutil

    memory = psutil.virtual_memory()
    return memory.total, memory.available


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
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            props = torch.cuda.get_device_properties(index)
            found.append(DeviceInfo(f"cuda:{index}", kind, index, props.name, total, free, fp16=True,
                                    bf16=kind == "rocm" or props.major >= 8))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        for index in range(xpu.device_count()):
            props = xpu.get_device_properties(index)
            total = getattr(props, "total_memory", 0)
            free = xpu.mem_get_info(index)[0] if hasattr(xpu, "mem_get_info") else total
            found.append(DeviceInfo(f"xpu:{index}", "xpu", index, props.name, total, free, fp16=True, bf16=True))
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


def worker_devices(setting: str | list[str], preferred: str, devices: list[DeviceInfo]) -> list[DeviceInfo]:
    """The devices a runner runs one worker each on (`[runner] devices`). "auto": every device of
    the kind `[device] preferred` selects (auto: the best kind here; an exact id: that one device).
    A list (or a comma-separated string) names each worker's device; a name given twice makes two
    workers on that device."""
    if isinstance(setting, str):
        setting = [part.strip() for part in setting.split(",") if part.strip()] or ["auto"]
    if [name.lower() for name in setting] == ["auto"]:
        best = select(preferred, devices)
        exact = (preferred or "auto").lower() not in ("auto", best.kind, "cuda")
        return [best] if exact else [d for d in devices if d.kind == best.kind]
    if not setting:
        raise DeviceUnavailable("[runner] devices names no device")
    return [select(name, devices) for name in setting]


def torch_device(device: DeviceInfo):
    import torch

    if device.kind == "directml":
        return _directml().device(device.index)
    return torch.device(device.id)


HALF_PRECISION = (*CUDA_API, "xpu")  # kinds that run in float16 by default


def dtype_for(device: DeviceInfo, configured: str = "auto", half: str = "fp16"):
    """The torch dtype of a configured precision; "auto": the model's `half` ("fp16", or "bf16" for
    the families that overflow in float16, where the device has it) on GPUs, float32 elsewhere."""
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if configured != "auto":
        return names[configured]
    if device.kind not in HALF_PRECISION:
        return torch.float32
    return torch.bfloat16 if half == "bf16" and device.bf16 else torch.float16


def torch_dtype_bytes(device: DeviceInfo) -> int:
    """Bytes per value at the default precision of this device (see dtype_for)."""
    return 2 if device.kind in HALF_PRECISION else 4


def generator_device(device: DeviceInfo) -> str:
    """Where seeded generators live: CPU for DirectML and MPS (reproducible), else the device."""
    if device.kind in CUDA_API:
        return "cuda"
    return "xpu" if device.kind == "xpu" else "cpu"


def discovery_step(ctx: StepContext) -> StepResult:
    """device_discovery: the device this session runs on: the worker's that claimed it (which took
    it because its device is the one the job pins, or the job pins none); outside a runner's worker,
    params.device, else config."""
    found = discover()
    device = ctx.device or select(ctx.params.device or ctx.config.get("device", "preferred"), found)
    dtype = str(dtype_for(device, ctx.config.get("device", "dtype"))).replace("torch.", "")
    return StepResult(data={"device": device.id, "device_name": device.name, "dtype": dtype,
                            "devices": [asdict(d) for d in found]})


def device_of(ctx: StepContext) -> DeviceInfo:
    """The device of the worker running this step; outside a worker, the one an earlier
    device_discovery step chose (or a fresh choice)."""
    if ctx.device is not None:
        return ctx.device
    return select(ctx.previous_value("device") or ctx.params.device or ctx.config.get("device", "preferred"))
