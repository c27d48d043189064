"""The registry of local models: diffusers folders, single-file checkpoints, LoRAs, ControlNets,
VAEs, upscalers and safety checkers, by id. It reads only metadata: no weights, no torch.

Entries live in `<models_dir>/registry.json`; diffusers folders placed directly in models_dir are
found too (their folder name is their id). Pickle formats run code when loaded and are refused
with UNSAFE_MODEL_FORMAT unless config.toml allows them. The one exception to "metadata only": a
file registered as an upscaler is opened with spandrel (on the CPU) to check that it is one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.domains import families
from engine.errors import UnknownModel, UnsafeModelFormat, ValidationError
from engine.files import atomic_write_json

KINDS = ("pipeline", "lora", "controlnet", "vae", "upscaler", "safety")
PRECISIONS = ("fp16", "bf16", "fp32", "fp8")  # fp8: float8 attention layers in a bfloat16 pipeline
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class ModelEntry:
    id: str
    kind: str
    path: str
    format: str
    family: str = ""
    default_size: int = 0
    sha256: str = ""
    # For a single-file pipeline: a diffusers pipeline folder of the same architecture whose
    # configs, tokenizers and scheduler it is loaded with (a single file holds weights only).
    configs_from: str = ""
    # The width of the text context its cross-attention takes (768 SD 1.5, 1024 SD 2, 2048 SDXL):
    # a LoRA or ControlNet fits a pipeline only when theirs are equal. 0: unknown.
    context_dim: int = 0
    # The compiled fast path (engine.domains.accelerate): "on", "off", or "" for the config's default.
    compile: str = ""
    # A pipeline's precision: fp16, bf16, fp32, fp8 (engine.domains.float8), or "" for the config's.
    precision: str = ""
    # A model of its family that differs in its defaults (FLUX.1 "schnell"), "" for the family's own.
    variant: str = ""

    def location(self, models_dir: Path) -> Path:
        return _located(self.path, models_dir)

    def configs_location(self, models_dir: Path) -> Path | None:
        return _located(self.configs_from, models_dir) if self.configs_from else None


def default_precision(config) -> str:
    """The precision of pipelines registered without one: `[models] precision`, else `[device]
    dtype` ("auto": fp16 on GPUs, fp32 elsewhere)."""
    return str(config.get("models", "precision")) or str(config.get("device", "dtype"))


def precision_of(entry: ModelEntry, config) -> str:
    """A pipeline's precision: its own, else the config's default."""
    return entry.precision or default_precision(config)


def _located(path: str, models_dir: Path) -> Path:
    return Path(path) if Path(path).is_absolute() else models_dir / path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """A hash over the names, sizes and mtimes of a folder's files (cheap; weights are not read)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, ...}, from the file's header alone."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000 or length > path.stat().st_size - 8:
                raise ValueError("its header length is impossible")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a table of tensors")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{path.name} is not a readable .safetensors file ({exc})") from None
    return {k: v for k, v in header.items() if k != "__metadata__"}


def safetensors_keys(path: Path) -> list[str]:
    return list(safetensors_header(path))


FAMILY_OF_CONTEXT = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def context_dim_of(path: Path) -> int:
    """The cross-attention context width a model takes (0 when it cannot be told from metadata)."""
    try:
        if path.is_dir():
            config_file = path / "unet" / "config.json" if (path / "model_index.json").is_file() else path / "config.json"
            value = json.loads(config_file.read_text()).get("cross_attention_dim", 0)
            return int(value[0] if isinstance(value, list) else value or 0)
        if path.suffix.lower() != ".safetensors":
            return 0
        for key, info in safetensors_header(path).items():
            lowered = key.lower()
            if "attn2" in lowered and "to_k" in lowered and not any(t in lowered for t in ("lora_b", "lora.up", "lora_up")):
                shape = info.get("shape") or []
                if len(shape) == 2:
                    return int(shape[1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0
    return 0


def adapter_family(path: Path, keys: list[str], context_dim: int) -> str:
    """sdxl, sd15 or sd2 for a LoRA or ControlNet, where the metadata tells; else ''."""
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if config.get("addition_embed_type") == "text_time":
            return "sdxl"
    named = families.lora_family(" ".join(keys[:2000]))
    if named:
        return named
    return FAMILY_OF_CONTEXT.get(context_dim, "sd15" if path.is_dir() and context_dim == 0 else "")


def fits(adapter: ModelEntry, pipeline: ModelEntry) -> bool:
    """Whether a LoRA or ControlNet was made for this pipeline's architecture (unknown: assume so)."""
    if adapter.context_dim and pipeline.context_dim:
        return adapter.context_dim == pipeline.context_dim
    if adapter.context_dim and pipeline.family and families.family_of(pipeline.family).denoiser != "unet":
        return False  # made for a UNet's cross-attention: a transformer has none
    return not (adapter.family and pipeline.family and adapter.family != pipeline.family)


def describe_family(entry: ModelEntry) -> str:
    width = f"cross-attention width {entry.context_dim}" if entry.context_dim else "width unknown"
    return f"{entry.family or 'unknown family'} ({width})"


def guess_kind(path: Path) -> tuple[str, str, str]:
    """(kind, format, family) of a model folder or file, from metadata alone."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            index = json.loads((path / "model_index.json").read_text())
            family = families.recognise_folder(index) or "sd15"
            if index.get("_class_name", "").endswith("SafetyChecker"):
                return "safety", "diffusers", ""
            return "pipeline", "diffusers", family
        config_file = path / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            name = config.get("_class_name", "") or "".join(config.get("architectures", []))
            if "ControlNet" in name:
                return "controlnet", "diffusers", families.family_of_controlnet(name)
            if "Autoencoder" in name:
                return "vae", "diffusers", ""
            if "SafetyChecker" in name:
                return "safety", "diffusers", ""
        raise ValidationError(f"{path}: not a diffusers folder (no model_index.json or known config.json)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "upscaler", "pickle", ""
    if path.suffix.lower() != ".safetensors":
        raise ValidationError(f"{path.name}: unknown model format (want a diffusers folder or .safetensors)")
    keys = safetensors_keys(path)
    joined = " ".join(keys[:2000])
    if "lora" in joined:
        return "lora", "safetensors", ""
    if "controlnet_cond_embedding" in joined:
        return "controlnet", "safetensors", ""
    family = families.recognise_keys(joined)
    if family:
        return "pipeline", "safetensors", family
    return "upscaler", "safetensors", ""


def check_upscaler(path: Path) -> str:
    """The architecture spandrel finds in an upscaler file; ValidationError when it finds none."""
    from spandrel import ImageModelDescriptor, ModelLoader

    try:
        descriptor = ModelLoader(device="cpu").load_from_file(str(path))
    except Exception as exc:
        raise ValidationError(
            f"{path.name}: not an upscaler spandrel knows ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); "
            "if it is another kind of model, name it with --kind") from None
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ValidationError(f"{path.name}: a {descriptor.architecture.name} model, not an image upscaler")
    return descriptor.architecture.name


class ModelRegistry:
    def __init__(self, models_dir: Path, allow_pickle: bool = False, default: str = "") -> None:
        self.models_dir = models_dir
        self.allow_pickle = allow_pickle
        self.default = default
        self.index_file = models_dir / "registry.json"

    def _read_index(self) -> dict[str, dict]:
        if not self.index_file.is_file():
            return {}
        return json.loads(self.index_file.read_text())

    def entries(self) -> dict[str, ModelEntry]:
        found: dict[str, ModelEntry] = {}
        if self.models_dir.is_dir():
            for folder in sorted(self.models_dir.iterdir()):
                if folder.is_dir() and (folder / "model_index.json").is_file():
                    kind, fmt, family = guess_kind(folder)
                    found[folder.name] = ModelEntry(folder.name, kind, folder.name, fmt, family, _native_size(folder),
                                                    context_dim=context_dim_of(folder),
                                                    variant=families.variant_of(family, folder))
        for model_id, data in self._read_index().items():
            found[model_id] = ModelEntry(**data)
        return found

    def get(self, model_id: str, kind: str | None = None, field: str = "params.model") -> ModelEntry:
        entry = self.entries().get(model_id)
        if entry is None or (kind and entry.kind != kind):
            known = sorted(k for k, e in self.entries().items() if kind is None or e.kind == kind)
            wanted = f"{kind} " if kind else ""
            listed = ", ".join(known) or "none (engine models add PATH --id ID)"
            if entry is not None:  # registered, but of another kind: say what it is
                raise UnknownModel(f"{field}: {model_id!r} is a registered {entry.kind}, not a {kind}; {kind}s: {listed}",
                                   [{"loc": field}])
            raise UnknownModel(f"{field}: unknown {wanted}model {model_id!r}; known: {listed}", [{"loc": field}])
        if entry.format == "pickle" and not self.allow_pickle:
            raise UnsafeModelFormat(f"{field}: {model_id!r} is a pickle file; allow it with models.allow_pickle")
        return entry

    def default_pipeline(self) -> ModelEntry:
        """The model of jobs that name none: `[models] default` when set, else the first pipeline:
        diffusers folders in models/ by name, then registered ones by id (the index is kept sorted)."""
        if self.default:
            return self.get(self.default, "pipeline", "models.default (config.toml)")
        pipelines = [e for e in self.entries().values() if e.kind == "pipeline"]
        if not pipelines:
            raise UnknownModel("no model is registered: engine models add PATH --id ID", [{"loc": "params.model"}])
        return pipelines[0]

    def add(self, path: Path, model_id: str, kind: str | None = None, configs_from: Path | None = None,
            compile_setting: str = "", precision: str = "") -> ModelEntry:
        path = path.resolve()
        if not path.exists():
            raise ValidationError(f"{path}: no such file or folder")
        if path.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
            raise UnsafeModelFormat(
                f"{path.name}: pickle formats (.ckpt, .bin, .pt, .pth) can run code when loaded; "
                "convert to .safetensors, or set models.allow_pickle = true"
            )
        if path.is_dir() and any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.rglob("*")) and not any(
            p.suffix == ".safetensors" for p in path.rglob("*")
        ) and not self.allow_pickle:
            raise UnsafeModelFormat(f"{path}: holds only pickle weights; convert to safetensors")
        guessed_kind, fmt, family = guess_kind(path)
        kind = kind or guessed_kind
        if kind not in KINDS:
            raise ValidationError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")
        configs = self._configs_folder(configs_from, kind, fmt, family) if configs_from else ""
        keys = safetensors_keys(path) if path.is_file() and fmt == "safetensors" else []
        if kind == "pipeline" and keys and not configs and not families.holds_vae(keys):
            known = families.family_of(family)
            raise ValidationError(
                f"{path.name} holds only {known.label}'s {known.denoiser}, no VAE or text encoders: register it with "
                f"--configs-from FOLDER, FOLDER a diffusers {known.label} pipeline folder whose text encoders and VAE "
                "it runs with")
        sha = file_sha256(path) if path.is_file() else folder_fingerprint(path)
        context_dim = context_dim_of(path if not configs else _located(configs, self.models_dir))
        if kind in ("lora", "controlnet"):
            family = family or adapter_family(path, keys, context_dim)
        if compile_setting and kind != "pipeline":
            raise ValidationError("--compile is for pipelines only")
        if precision and precision not in PRECISIONS:
            raise ValidationError(f"--precision {precision!r}: one of {', '.join(PRECISIONS)}")
        if precision and kind != "pipeline":
            raise ValidationError("--precision is for pipelines only")
        if kind == "upscaler" and fmt == "safetensors":
            check_upscaler(path)
        entry = ModelEntry(model_id, kind, self._stored(path), fmt, family, _native_size(path) if path.is_dir() else 0,
                           sha, configs, context_dim, compile_setting, precision,
                           _variant(family, path, keys) if kind == "pipeline" else "")
        index = self._read_index()
        index[model_id] = asdict(entry)
        atomic_write_json(self.index_file, index)
        return entry

    def _stored(self, path: Path) -> str:
        """A path inside the models folder is kept relative to it, so the folder can move."""
        try:
            return str(path.relative_to(self.models_dir.resolve()))
        except ValueError:
            return str(path)

    def _configs_folder(self, folder: Path, kind: str, fmt: str, family: str) -> str:
        if kind != "pipeline" or fmt != "safetensors":
            raise ValidationError("--configs-from is for single-file (.safetensors) pipeline checkpoints only")
        folder = folder.resolve()
        folder_kind, _, folder_family = guess_kind(folder)  # refuses what is no model folder at all
        if folder_kind != "pipeline":
            raise ValidationError(f"{folder}: a {folder_kind}, not a diffusers pipeline folder")
        if folder_family != family:
            raise ValidationError(f"{folder.name} is an {folder_family} pipeline; the checkpoint is {family}")
        return self._stored(folder)


def _variant(family: str, path: Path, keys: list[str]) -> str:
    """A pipeline's variant: from its folder, or from a single file's tensor names."""
    return families.variant_of(family, path) if path.is_dir() else families.variant_of_keys(family, " ".join(keys))


def _native_size(folder: Path) -> int:
    """The image size a diffusers pipeline was trained for: its denoiser's sample_size x the VAE's
    scale (x the patch size of a transformer), else its family's native size (FLUX says none)."""
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
        if (folder / "unet" / "config.json").is_file():
            return int(json.loads((folder / "unet" / "config.json").read_text())["sample_size"]) * scale
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        if transformer.get("sample_size"):
            return int(transformer["sample_size"]) * scale * int(transformer.get("patch_size", 1))
        index = json.loads((folder / "model_index.json").read_text())
        family = families.recognise_folder(index)
        return families.family_of(family).native_size if family else 0
    except (OSError, KeyError, ValueError, TypeError):
        return 0
