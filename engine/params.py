"""Generation params: what a session's steps are given, validated (pydantic) and resolved at
submit. Below the doors' job files (engine.ingest), the runner (engine.run) and the domains, which
all read these and import nothing of each other for them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from engine.errors import ValidationError

SCHEDULERS = ("ddim", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "dpm++sde", "pndm", "lms", "heun", "unipc")
MAX_SEED = 2**32 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ControlNetParams(Strict):
    model: str = Field(min_length=1, max_length=128)
    image: str = Field(min_length=1, max_length=1024)
    conditioning_scale: float = Field(1.0, ge=0.0, le=5.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)


class LoraParams(Strict):
    model: str = Field(min_length=1, max_length=128)
    scale: float = Field(1.0, ge=-5.0, le=5.0)


class UpscaleOp(Strict):
    op: Literal["upscale"]
    model: str | None = Field(None, max_length=128, description="an upscaler id; Lanczos when absent")
    scale: float = Field(2.0, gt=0.0, le=8.0)


class EnhanceOp(Strict):
    op: Literal["enhance"]
    preset: str | None = Field(None, max_length=64)
    sharpness: float | None = Field(None, ge=0.0, le=5.0)
    contrast: float | None = Field(None, ge=0.0, le=5.0)
    color: float | None = Field(None, ge=0.0, le=5.0)
    brightness: float | None = Field(None, ge=0.0, le=5.0)
    auto_levels: bool | None = None


class SafetyCheckOp(Strict):
    op: Literal["safety_check"]


PostprocessOp = Annotated[Union[UpscaleOp, EnhanceOp, SafetyCheckOp], Field(discriminator="op")]


class GenerationParams(Strict):
    model: str | None = Field(None, max_length=128)
    prompt: str = Field("", max_length=20000)
    negative_prompt: str = Field("", max_length=20000)
    width: int | None = Field(None, ge=8, le=16384, multiple_of=8)
    height: int | None = Field(None, ge=8, le=16384, multiple_of=8)
    steps: int = Field(30, ge=1, le=10000)
    guidance_scale: float = Field(7.0, ge=0.0, le=100.0)
    scheduler: Literal[SCHEDULERS] | None = None  # type: ignore[valid-type]
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)
    num_images: int = Field(1, ge=1, le=1024)
    init_image: str | None = Field(None, max_length=1024)
    strength: float = Field(0.75, ge=0.0, le=1.0)
    mask_image: str | None = Field(None, max_length=1024)
    controlnet: ControlNetParams | None = None
    loras: list[LoraParams] = Field(default_factory=list, max_length=16)
    vae: str | None = Field(None, max_length=128, description="a registered VAE id, instead of the model's own")
    hires_scale: float = Field(2.0, ge=1.0, le=4.0, description="txt2img-hires: how much larger the second pass is")
    hires_steps: int | None = Field(None, ge=1, le=10000, description="txt2img-hires: steps of the second pass (else steps)")
    hires_strength: float = Field(0.55, gt=0.0, le=1.0, description="txt2img-hires: denoising strength of the second pass")
    hires_upscaler: str | None = Field(None, max_length=128, description="txt2img-hires: an upscaler id; Lanczos when absent")
    postprocess: list[PostprocessOp] = Field(default_factory=list, max_length=16)
    device: str | None = Field(None, max_length=32, description="cpu, cuda, cuda:1, mps, directml; default from config")


class StepParams(GenerationParams):
    """A session's params as its steps get them: validated and resolved at submit (the model, the
    size and the seed filled in), with the SHA-256 of each input image for the step to know the
    very file again. Handlers and the domains' submit-time checks read these, never a dict."""

    input_digests: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def of(cls, data: dict[str, Any]) -> "StepParams":
        """From the params a session stored (resolved at submit; validated again here)."""
        try:
            return cls.model_validate(data)
        except PydanticValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = "params" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
            raise ValidationError(f"{where}: {first['msg']}", [{"loc": where, "message": first["msg"]}]) from None


def pin_of(params: dict) -> str:
    """The device a session's params pin it to ("" for none), as the claim query compares it."""
    wanted = str(params.get("device") or "").strip().lower()
    return "" if wanted == "auto" else wanted
