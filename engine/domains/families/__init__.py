"""Model families: what the engine knows of each architecture, one module a family.

A family (`Family`) says how to recognise its models (a diffusers folder's model_index.json, a
single file's tensor names), its pipeline class per mode, its denoiser, its size grid, native size
and defaults (steps, guidance), its schedulers by name, how it takes guidance (classifier-free,
FLUX's distilled guidance, none), and which adapters it takes. Nothing about families lives
elsewhere: the catalogue recognises models through `recognise_folder` / `recognise_keys`, submit
checks a job through `check`, and the inference domain builds pipelines and schedulers through a
family's fields. Adding a family is one module here and its tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.errors import ValidationError

# name -> (diffusers scheduler class, extra config): the SD-class (epsilon) schedulers.
SD_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# The flow-matching families' schedulers: their own Euler (the default they ship with).
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}

# How a family takes guidance: "cfg" (classifier-free: a negative prompt is encoded, guidance_scale
# weighs it), "cfg_above_1" (classifier-free only when guidance_scale > 1, as Z-Image), "distilled"
# (FLUX.1: guidance is an input of the transformer; there is no negative prompt).
GUIDANCE_KINDS = ("cfg", "cfg_above_1", "distilled")


@dataclass(frozen=True)
class Variant:
    """A model of a family that differs in its defaults (FLUX.1 schnell: 4 steps, no guidance)."""

    name: str
    steps: int
    guidance_scale: float
    guidance_fixed: bool = False  # the model takes no guidance: a job may not set guidance_scale


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    denoiser: str  # "unet" or "transformer"
    pipelines: dict[str, str]  # mode -> diffusers pipeline class (txt2img, img2img, inpaint, controlnet)
    size_multiple: int
    native_size: int
    steps: int
    guidance_scale: float
    guidance: str
    schedulers: dict[str, tuple[str, dict[str, Any]]]
    # model_index.json -> whether a diffusers folder is of this family
    recognise_index: Callable[[dict[str, Any]], bool]
    # a single .safetensors file's tensor names (joined by spaces) -> whether it is a checkpoint of this family
    recognise_keys: Callable[[str], bool] = lambda joined: False
    # a LoRA's tensor names (joined) -> whether it was made for this family
    lora_keys: Callable[[str], bool] = lambda joined: False
    # a diffusers folder of this family -> its Variant (None: the family's defaults)
    variant_of: Callable[[Any], Variant | None] = lambda folder: None
    # a single file's tensor names (joined) -> its Variant (None: the family's defaults)
    variant_of_keys: Callable[[str], Variant | None] = lambda joined: None
    loras: bool = True
    float8: bool = True
    controlnet_class: str = "ControlNetModel"  # the diffusers class of its ControlNets (the "controlnet" mode)
    half: str = "fp16"  # the half precision it runs in on a GPU when none is set ("bf16": it overflows in fp16)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.pipelines)

    def defaults(self, variant: str = "") -> tuple[int, float, bool]:
        """(steps, guidance_scale, guidance fixed) of a model of this family and variant."""
        for known in VARIANTS.get(self.name, ()):
            if known.name == variant:
                return known.steps, known.guidance_scale, known.guidance_fixed
        return self.steps, self.guidance_scale, False

    def describe(self) -> dict[str, Any]:
        """What the family supports, for `engine models families`, /v1/capabilities and the docs."""
        return {"family": self.name, "label": self.label, "denoiser": self.denoiser, "modes": list(self.modes),
                "size_multiple": self.size_multiple, "native_size": self.native_size, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "guidance": self.guidance,
                "negative_prompt": self.guidance != "distilled", "schedulers": sorted(self.schedulers),
                "loras": self.loras, "controlnet": "controlnet" in self.pipelines, "float8": self.float8,
                "gpu_precision": self.half,
                "variants": [v.__dict__ for v in VARIANTS.get(self.name, ())]}


FAMILIES: dict[str, Family] = {}
VARIANTS: dict[str, tuple[Variant, ...]] = {}


def register(family: Family, variants: tuple[Variant, ...] = ()) -> Family:
    FAMILIES[family.name] = family
    VARIANTS[family.name] = variants
    return family


def family_of(name: str) -> Family:
    """The family of this name; the SD 1.5 family for a model of no known family (as before families)."""
    _load()
    return FAMILIES.get(name) or FAMILIES["sd15"]


def known() -> dict[str, Family]:
    _load()
    return dict(FAMILIES)


def recognise_folder(index: dict[str, Any]) -> str:
    """The family of a diffusers pipeline folder, from its model_index.json ('' when none knows it)."""
    _load()
    return next((f.name for f in FAMILIES.values() if f.recognise_index(index)), "")


def recognise_keys(joined: str) -> str:
    """The family of a single-file checkpoint, from its tensor names ('' when none knows it)."""
    _load()
    return next((f.name for f in FAMILIES.values() if f.recognise_keys(joined)), "")


def lora_family(joined: str) -> str:
    """The family a LoRA was made for, from its tensor names ('' when none says)."""
    _load()
    return next((f.name for f in FAMILIES.values() if f.lora_keys(joined)), "")


def variant_of(family: str, folder) -> str:
    _load()
    found = FAMILIES[family].variant_of(folder) if family in FAMILIES else None
    return found.name if found else ""


def variant_of_keys(family: str, joined: str) -> str:
    """The variant of a single file of this family, from its tensor names ('' for the family's own)."""
    _load()
    found = FAMILIES[family].variant_of_keys(joined) if family in FAMILIES else None
    return found.name if found else ""


def family_of_controlnet(class_name: str) -> str:
    """The family a ControlNet folder's class belongs to ('' for the UNets' shared ControlNetModel:
    its cross-attention width tells which UNet family)."""
    _load()
    return next((f.name for f in FAMILIES.values() if f.controlnet_class == class_name != "ControlNetModel"), "")


# Tensor names only a file that holds a VAE has: an original checkpoint's first stage, a combined
# file's "vae." part, a bare VAE's decoder.
VAE_KEYS = ("first_stage_model.", "vae.", "decoder.conv_in.")


def holds_vae(keys: list[str]) -> bool:
    """Whether a single file is a whole pipeline (it holds a VAE), not its denoiser alone."""
    return any(key.startswith(VAE_KEYS) for key in keys)


def nearest_on_grid(value: int, multiple: int) -> int:
    """The nearest multiple of `multiple` to `value` (ties go up), never below `multiple`."""
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def check(family: Family, variant: str, params, given: set[str], mode: str, where: str, model_id: str) -> None:
    """A job's params against its model's family, at submit: a scheduler it cannot use, a size off
    its grid, a negative prompt or guidance it does not take, a mode it has no pipeline for. Each is
    refused naming what it takes instead; nothing that passes fails later for a family reason."""

    def refuse(name: str, message: str) -> None:
        raise ValidationError(f"{where}.{name}: {message}", [{"loc": f"{where}.{name}"}])

    if params.scheduler and params.scheduler not in family.schedulers:
        refuse("scheduler", f"{model_id!r} is {family.label}, which cannot use {params.scheduler!r}; its schedulers: "
               f"{', '.join(sorted(family.schedulers))}")
    for name in ("width", "height"):
        value = getattr(params, name)
        if value and value % family.size_multiple:
            refuse(name, f"{value} is off {family.label}'s grid (multiples of {family.size_multiple}); "
                   f"the nearest valid size is {nearest_on_grid(value, family.size_multiple)}")
    _, _, fixed = family.defaults(variant)
    if params.negative_prompt and family.guidance == "distilled":
        refuse("negative_prompt", f"{model_id!r} is {family.label}, which has no classifier-free guidance to take a "
               "negative prompt; leave it out")
    if params.negative_prompt and family.guidance == "cfg_above_1" and params.guidance_scale <= 1:
        refuse("negative_prompt", f"{model_id!r} is {family.label}: a negative prompt is used only with "
               f"guidance_scale above 1 (it is {params.guidance_scale:g}); raise guidance_scale or leave it out")
    if fixed and "guidance_scale" in given:
        refuse("guidance_scale", f"{model_id!r} is {family.label} {variant}, which takes no guidance; leave "
               "guidance_scale out")
    if mode and mode != "hires" and mode not in family.pipelines:
        refuse("model", f"{model_id!r} is {family.label}, which has no {mode} pipeline here; its modes: "
               f"{', '.join(family.modes)}")
    if params.loras and not family.loras:
        refuse("loras", f"{model_id!r} is {family.label}, which takes no LoRAs here")


def unused_params(family: Family, variant: str = "") -> list[str]:
    """The job params a model of this family and variant does not take (the submit form hides them;
    `check` refuses them): a negative prompt without classifier-free guidance, guidance on a model
    that takes none, a ControlNet or LoRAs where the family has no way to attach them."""
    _, _, fixed = family.defaults(variant)
    return [name for name, unused in (("negative_prompt", family.guidance == "distilled"), ("guidance_scale", fixed),
                                      ("controlnet", "controlnet" not in family.pipelines),
                                      ("loras", not family.loras)) if unused]


def _load() -> None:
    if not FAMILIES:
        from engine.domains.families import flux, sd3, sd15, sdxl, zimage  # noqa: F401  (each registers itself)
