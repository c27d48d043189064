"""The float8 precision: a denoiser's attention-block linear layers computed in float8 (e4m3).

A plain module swap around `torch._scaled_mm`, no tensor subclasses: each weight is stored in
float8 with its scales (computed once, when the model is loaded), each input is scaled at every call
(dynamic scaling: no calibration), and the product comes back in bfloat16 (so a float8 model runs
in bfloat16), accumulated the fast way (Hopper's fast float8 accumulation: the product of a
forward pass, never a gradient). Scales are one per row ("row": one per output row of the weight,
one per row of the input; the finer) or one per tensor ("tensor": cuBLAS's own float8 product).
Under torch.compile the input's scaling is fused into one kernel before the matrix product;
eagerly it is a few extra passes.

Only the linear layers inside attention blocks are swapped (projections, feed-forward); the time
and text embeddings, the convolutions and attention itself stay in bfloat16 (what that gains on a
GPU is measured in docs/performance.md: little, for SDXL at 1024x1024: the input scaling gives back most of
what the faster products gain). A layer whose sizes are not multiples of 16 stays too (the matrix
units' rule).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("engine.float8")

E4M3_MAX = 448.0  # the largest finite float8 e4m3 value
SCALINGS = ("row", "tensor")
SWAPPED_INSIDE = ("attentions.", "transformer_blocks.", "single_transformer_blocks.")


def swappable(name: str, module) -> bool:
    """A linear layer inside an attention block whose sizes the float8 product takes."""
    import torch

    return (isinstance(module, torch.nn.Linear) and any(part in name for part in SWAPPED_INSIDE)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def to_float8(denoiser, scaling: str = "row") -> int:
    """Swap `denoiser`'s swappable linear layers (in place) for float8 ones with `scaling` ("row" or
    "tensor"); the count swapped. The denoiser should already be in bfloat16."""
    if scaling not in SCALINGS:
        raise ValueError(f"float8 scaling {scaling!r}: one of {', '.join(SCALINGS)}")
    targets = [(name, module) for name, module in denoiser.named_modules() if swappable(name, module)]
    for name, module in targets:
        owner, _, attribute = name.rpartition(".")
        setattr(denoiser.get_submodule(owner) if owner else denoiser, attribute, float8_linear(module, scaling))
    log.info("float8: %d linear layers swapped (scales per %s)", len(targets), scaling)
    return len(targets)


def scaling_of(denoiser) -> str | None:
    """How `denoiser`'s float8 layers are scaled ("row" or "tensor"), or None if it has none."""
    float8_layer = _float8_linear_class()
    return next((module.scaling for module in denoiser.modules() if isinstance(module, float8_layer)), None)


def float8_linear(linear, scaling: str = "row"):
    """A float8 twin of a torch.nn.Linear (its weight quantized now, per output row or per tensor)."""
    return _float8_linear_class()(linear, scaling)


def quantize(values, scaling: str):
    """`values` (2-D) in float8 e4m3 with float32 scales: one per row ([rows, 1]) for "row", one in
    all (a 0-d tensor) for "tensor". (quantized, scales)."""
    import torch

    wide = values.float()
    amax = wide.abs().amax(dim=1, keepdim=True) if scaling == "row" else wide.abs().amax()
    scales = amax.clamp(min=1e-12) / E4M3_MAX
    return (wide / scales).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scales


@functools.cache
def _float8_linear_class():
    import torch

    class Float8Linear(torch.nn.Module):
        """y = x Wᵀ + b with W in float8 (scales per output row, or one) and x scaled likewise each call."""

        def __init__(self, linear, scaling: str = "row") -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.scaling = scaling
            weight, scales = quantize(linear.weight.detach(), scaling)
            self.register_buffer("weight_fp8", weight)  # [out, in], row-major: its transpose is column-major
            self.register_buffer("weight_scale", scales.t().contiguous())  # [1, out], or 0-d
            bias = linear.bias
            self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(torch.bfloat16),
                                                                      requires_grad=False)

        @property
        def weight(self):
            """The weight as bfloat16, for code that reads a linear layer's weight (its dtype, its device)."""
            return (self.weight_fp8.float() * self.weight_scale.t()).to(torch.bfloat16)

        def forward(self, x):
            leading = x.shape[:-1]
            rows, scales = quantize(x.reshape(-1, self.in_features), self.scaling)
            out = torch._scaled_mm(rows, self.weight_fp8.t(), scale_a=scales, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=torch.bfloat16, use_fast_accum=True)
            return out.reshape(*leading, self.out_features)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3, "
                    f"scales per {self.scaling}")

    return Float8Linear


def unsupported(device) -> str | None:
    """Why float8 cannot run on `device` (an engine.domains.device.DeviceInfo), or None when it can:
    CUDA with compute capability 8.9 or later (Ada, Hopper, Blackwell), or the CPU."""
    import torch

    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch._scaled_mm, which torch {torch.__version__} lacks"
    if device.kind == "cpu":
        return None
    if device.kind != "cuda":
        return "a CUDA GPU of compute capability 8.9 or later, or the CPU"
    from engine.domains.device import torch_device

    capability = torch.cuda.get_device_capability(torch_device(device))
    if capability < (8, 9):
        return f"compute capability 8.9 or later ({device.id} has {capability[0]}.{capability[1]})"
    return None
