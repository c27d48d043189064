"""A stand-in for torch_directml with the same API surface the engine uses.

The real package runs only where Direct3D 12 exists (Windows, WSL). This one reports one adapter
and hands out CPU tensors' device, so the DirectML selection path runs end to end on any machine.
"""

import torch

ADAPTER = "Stand-in DirectML Adapter"


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def device_name(index: int) -> str:
    return ADAPTER


def default_device() -> int:
    return 0


def device(index: int | None = None) -> torch.device:
    return torch.device("cpu")
