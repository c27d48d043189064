"""The submit form, built from the job file's JSON Schema (`engine schema`): one field per param,
its kind, bounds and default read from the schema, in groups. Pure: a schema in, fields out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GROUPS = {
    "prompt": ("prompt", "negative_prompt"),
    "picture": ("model", "width", "height", "steps", "guidance_scale", "scheduler", "seed", "num_images"),
    "init and mask images (img2img, inpaint)": ("init_image", "strength", "mask_image"),
    "second pass (txt2img-hires)": ("hires_scale", "hires_steps", "hires_strength", "hires_upscaler"),
}
LONG_TEXT = 1000  # a string allowed longer than this is a text area
CATALOGUE_FIELDS = ("model",)  # chosen from the registered models


@dataclass
class Field:
    name: str
    label: str
    kind: str  # text, textarea, integer, number, checkbox, select, image, json
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | str | None = None
    options: list[str] = field(default_factory=list)
    optional: bool = False
    help: str = ""


def _plain(spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The non-null branch of an `anyOf: [X, null]`, and whether null is allowed."""
    branches = spec.get("anyOf")
    if not branches:
        return spec, False
    kept = [b for b in branches if b.get("type") != "null"]
    return (kept[0] if len(kept) == 1 else {"anyOf": kept}), len(kept) < len(branches)


def field_of(name: str, spec: dict[str, Any], models: list[str]) -> Field:
    plain, optional = _plain(spec)
    label = spec.get("title") or name.replace("_", " ")
    common = {"name": name, "label": label, "default": spec.get("default"), "optional": optional,
              "help": spec.get("description", "")}
    kind = plain.get("type")
    if name.endswith("_image"):
        return Field(kind="image", **common)
    if name in CATALOGUE_FIELDS:
        return Field(kind="select", options=models, **common)
    if "enum" in plain:
        return Field(kind="select", options=[str(v) for v in plain["enum"]], **common)
    if kind in ("integer", "number"):
        step = plain.get("multipleOf") or (1 if kind == "integer" else "any")
        return Field(kind=kind, minimum=plain.get("minimum", plain.get("exclusiveMinimum")),
                     maximum=plain.get("maximum"), step=step, **common)
    if kind == "boolean":
        return Field(kind="checkbox", **common)
    if kind == "string":
        return Field(kind="textarea" if (plain.get("maxLength") or 0) > LONG_TEXT else "text", **common)
    return Field(kind="json", **common)  # lists and objects (loras, postprocess, controlnet): typed as JSON


def param_groups(schema: dict[str, Any], models: list[str]) -> list[tuple[str, list[Field]]]:
    """The params' fields in groups (the named ones first, then "more" with everything else), in
    the schema's order within a group."""
    properties = schema["$defs"]["GenerationParams"]["properties"]
    placed = {name for names in GROUPS.values() for name in names}
    groups = [(title, [field_of(n, properties[n], models) for n in names if n in properties])
              for title, names in GROUPS.items()]
    rest = [field_of(n, spec, models) for n, spec in properties.items() if n not in placed]
    return groups + [("more", rest)]


def model_form(described: dict[str, Any]) -> dict[str, Any]:
    """What the form shows for one model (`reads.family_of_model`): the fields its family does not
    use (hidden), its defaults (the placeholders), its schedulers and its size grid."""
    size = described["native_size"]
    return {"family": described["label"] + (f" {described['variant']}" if described.get("variant") else ""),
            "unused": described["unused_params"], "schedulers": described["schedulers"],
            "size_multiple": described["size_multiple"],
            "defaults": {"steps": described["steps"], "guidance_scale": described["guidance_scale"], "width": size,
                         "height": size}}


def job_fields(schema: dict[str, Any]) -> list[Field]:
    """The job's own fields beside its params: priority, job_id, hold."""
    properties = schema["$defs"]["SessionJob"]["properties"]
    return [field_of(name, properties[name], []) for name in ("priority", "job_id", "hold") if name in properties]
