"""The compiled fast path: an opt-in, per model, for CUDA (and CPU). channels_last memory layout
and torch.compile of the UNet (or transformer) and the VAE decoder, for the call sizes the
BatchManager uses. Calls with LoRAs run eagerly (their adapters change the modules a compiled graph
was traced from). QKV projections are not fused: a LoRA attaches to the separate projections.
A VAE that diffusers upcasts to float32 to decode (SDXL's: it overflows in float16) is decoded in
bfloat16 instead where the GPU has it (`[compile] vae_upcast`): float32's range at about a third
of the time, from the compiled path's own copy of the decoder.

Compiling is paid once per machine: torch's on-disk caches (inductor's generated kernels, its FX
graph cache and AOTAutograd's) live under the engine's `[compile] cache` folder, one folder per
torch version and GPU, so a new torch or another GPU compiles afresh; inside it entries are keyed
by the graphs themselves, so a model of another architecture compiles afresh too (weights are
inputs of the compiled code, never part of it). `engine warmup` compiles ahead.

Compiling never costs an image: a call whose compiled run fails (a compile error, a shape it
cannot take) is made again eagerly, and that shape is not tried compiled again in this process.
With `[compile] background` (off by default) it need not hold images up either: the first call of
a shape is made eagerly, and its modules' inputs in that call are kept; a thread compiles the
modules with them while later calls of the shape go on eagerly, and the first call after it is
done switches to the compiled path (`model.compile_started`, then `model.compiled` with
`background: true`, the compile's seconds and the eager calls made meanwhile). The thread shares
the interpreter with the calls: while it traces, they slow down (measured in the README).
`engine warmup` compiles in the foreground.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("engine.compile")

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
Shape = tuple[str, int, int, int]  # mode, images in the call, width, height


def wanted(entry_setting: str, config) -> bool:
    """The model's own setting ("on" / "off"), else the config's default."""
    if entry_setting in ("on", "off"):
        return entry_setting == "on"
    return bool(config.get("compile", "default"))


def bucket_split(images: int, sizes: list[int]) -> list[int]:
    """A call of `images` as calls of compiled sizes, largest first (7 with [1, 2, 4, 8]: 4, 2, 1).
    Sizes below the smallest compiled one stay as they are."""
    chunks, left = [], images
    for size in sorted(set(sizes), reverse=True):
        while size > 0 and left >= size:
            chunks.append(size)
            left -= size
    return chunks + ([left] if left else [])


def cache_folder(config, gpu_name: str, torch_version: str) -> Path:
    """Where this machine's compile caches live: one folder per torch version and GPU."""
    base = Path(str(config.get("compile", "cache"))).expanduser()
    base = base if base.is_absolute() else config.base_dir / base
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"torch-{torch_version}-{gpu_name}").strip("-").lower()
    return base / slug


def use_cache(folder: Path) -> None:
    """Point torch's compile caches at `folder` (before anything is compiled in this process)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))


@dataclass
class Accelerated:
    """A pipeline's eager and compiled denoiser and decoder, and which call shapes ran compiled."""

    pipe: Any
    eager: dict[str, Any]
    compiled: dict[str, Any]
    sizes: list[int]
    mode: str
    backend: str
    cache: Path | None
    done: set = field(default_factory=set)  # shapes that ran compiled
    failed: dict = field(default_factory=dict)  # shape -> why it runs eagerly
    background: bool = False  # compile a new shape in a thread while its calls go on eagerly
    behind: dict = field(default_factory=dict)  # shape -> its Behind (a background compile)

    def compiles(self, shape: Shape) -> bool:
        return shape[1] in self.sizes and shape not in self.failed

    @contextmanager
    def compiled_in(self, pipe) -> Iterator[None]:
        """`pipe` (this pipeline, or one made from it for another mode) with the compiled modules
        in place for one call, and its eager ones back after it."""
        for name, module in self.compiled.items():
            _set(pipe, name, module)
        try:
            yield
        finally:
            for name, module in self.eager.items():
                _set(pipe, name, module)


class Behind:
    """A background compile of one shape: each compiled module called once, in a thread of its
    own, with the inputs its eager twin had in the shape's first call."""

    def __init__(self, accelerated: Accelerated, shape: Shape, inputs: dict[str, tuple]) -> None:
        self.inputs = inputs
        self.seconds: float | None = None
        self.error: str | None = None
        self.eager_calls = 1  # the call whose inputs it compiles with
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._compile, args=(accelerated,), daemon=True,
                                       name=f"engine-compile-{shape[1]}x{shape[2]}x{shape[3]}")

    def _compile(self, accelerated: Accelerated) -> None:
        import torch

        started = time.perf_counter()
        try:
            with torch.no_grad(), _on_device_of(self.inputs):
                for name, (args, kwargs) in self.inputs.items():
                    accelerated.compiled[name](*args, **kwargs)
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
            self.seconds = round(time.perf_counter() - started, 3)
        except Exception as exc:  # a compile error or out of memory: the shape stays eager
            self.error = _described(exc)
        finally:
            self.inputs = {}
            self.finished.set()


def record_inputs(modules: dict[str, Any]) -> tuple[dict[str, tuple], Callable[[], None]]:
    """Hooks that keep a copy of each module's inputs in its first call; the copies (filled as the
    modules run) and a function that removes the hooks."""
    import torch
    from torch.utils._pytree import tree_map

    kept: dict[str, tuple] = {}
    handles = []

    def keeper(name):
        def hook(module, args, kwargs):
            if name not in kept:
                kept[name] = tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                                      (args, kwargs))
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(keeper(name), with_kwargs=True))
    return kept, lambda: [handle.remove() for handle in handles]


@contextmanager
def _on_device_of(inputs: dict[str, tuple]) -> Iterator[None]:
    """The CUDA device of the first tensor in `inputs` as this thread's current device (each
    thread has its own), or nothing for other devices."""
    import torch
    from torch.utils._pytree import tree_leaves

    device = next((v.device for v in tree_leaves(inputs) if isinstance(v, torch.Tensor)), None)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _described(exc: BaseException) -> str:
    """The error and its root cause, one line each at most: torch wraps a backend's error."""
    parts, seen = [], exc
    while seen is not None and len(parts) < 3:
        first = next((line.strip() for line in str(seen).splitlines() if line.strip()), "")
        parts.append(f"{type(seen).__name__}: {first}")
        seen = seen.__cause__ or getattr(seen, "inner_exception", None)
    return "; caused by ".join(parts)[:500]


def _set(pipe, name: str, module) -> None:
    owner, _, attribute = name.rpartition(".")
    setattr(pipe if not owner else getattr(pipe, owner), attribute, module)


def prepare(pipe, config, gpu_name: str) -> Accelerated:
    """channels_last on the pipeline's denoiser and VAE, and their compiled twins (compiled by
    torch at their first call of each shape)."""
    import torch

    mode, backend = str(config.get("compile", "mode")), str(config.get("compile", "backend"))
    if mode not in MODES:
        raise ValueError(f"[compile] mode {mode!r}: one of {', '.join(MODES)}")
    cache = None
    if backend == "inductor":
        cache = cache_folder(config, gpu_name, torch.__version__)
        use_cache(cache)
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    for module in (getattr(pipe, denoiser), pipe.vae):
        module.to(memory_format=torch.channels_last)
    eager = {denoiser: getattr(pipe, denoiser), "vae.decoder": pipe.vae.decoder}
    options = {"backend": backend, "fullgraph": False, "dynamic": False}
    if backend == "inductor":
        options["mode"] = mode
    compiled = {name: torch.compile(module, **options) for name, module in eager.items()}
    decode_dtype = upcast_decode_dtype(pipe, str(config.get("compile", "vae_upcast")))
    if decode_dtype is not None:
        import copy

        decoder = copy.deepcopy(pipe.vae.decoder).to(decode_dtype)
        compiled["vae.decoder"] = decoder_in(torch.compile(decoder, **options), decode_dtype)
    return Accelerated(pipe, eager, compiled, sorted({int(s) for s in config.get("compile", "batch_sizes")}),
                       mode, backend, cache, background=bool(config.get("compile", "background")))


def upcast_decode_dtype(pipe, setting: str):
    """The dtype the compiled path decodes in where diffusers would upcast the VAE to float32
    (a float16 VAE whose config says it overflows, as SDXL's): bfloat16 when asked for and the
    device has it (float32's range, so it does not overflow), else None (decoded as diffusers does)."""
    import torch

    if setting not in ("bfloat16", "float32"):
        raise ValueError(f"[compile] vae_upcast {setting!r}: bfloat16 or float32")
    vae = getattr(pipe, "vae", None)
    upcast = vae is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if setting == "float32" or not upcast or vae.device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def decoder_in(decoder, dtype):
    """A module that runs `decoder` in `dtype`: its input cast in, its output cast back. The
    decoder is held outside the module tree, so the pipeline's casts of its VAE (the float32
    upcast around decoding, and back) leave its weights alone."""
    return _decoder_in_class()(decoder, dtype)


@functools.cache
def _decoder_in_class():
    import torch

    class _DecoderIn(torch.nn.Module):
        """See decoder_in."""

        def __init__(self, decoder, dtype) -> None:
            super().__init__()
            self._decoder, self._dtype = (decoder,), dtype

        def forward(self, sample, *args, **kwargs):
            return self._decoder[0](sample.to(self._dtype), *args, **kwargs).to(sample.dtype)

    return _DecoderIn


def run_call(accelerated: Accelerated | None, pipe, shape: Shape, call: Callable[[], None],
             notify: Callable[[str, dict], None], model_id: str, device_id: str) -> bool:
    """Make one call: compiled when this shape compiles (and, compiling in the background, once
    its compile is done), else (or when the compiled run fails other than for memory or
    cancellation) eagerly. Returns whether it ran compiled. The first compiled run of a shape is
    reported as `model.compiled` (shape, seconds), a failure as `model.compile_failed`; the call
    itself is the caller's, and its images are made either way."""
    from engine.domains import memory
    from engine.errors import Cancelled

    if accelerated is None or not accelerated.compiles(shape):
        call()
        return False
    described = {"model_id": model_id, "device": device_id, "shape": list(shape)}
    behind = None
    if accelerated.background and shape not in accelerated.done:
        behind = accelerated.behind.get(shape)
        if behind is None or not behind.finished.is_set():
            _eagerly_while_compiling(accelerated, shape, call, notify, described)
            return False
        if behind.error is not None:
            accelerated.failed[shape] = behind.error
            log.warning("the background compile of %s for %s failed (%s); this shape stays eager", model_id, shape,
                        behind.error)
            notify("model.compile_failed", {**described, "error": behind.error, "background": True})
            call()
            return False
    started = time.perf_counter()
    error = None
    try:
        with accelerated.compiled_in(pipe):
            call()
    except Cancelled:
        raise
    except Exception as exc:
        if memory.is_oom(exc):
            raise
        error = _described(exc)
    if error is None:
        if shape not in accelerated.done:
            accelerated.done.add(shape)
            data = {**described, "seconds": round(time.perf_counter() - started, 3), "mode": accelerated.mode,
                    "backend": accelerated.backend, "cache": str(accelerated.cache) if accelerated.cache else None}
            if behind is not None:  # the switch: compiled behind calls that went on eagerly
                data.update(background=True, first_call_seconds=data["seconds"], seconds=behind.seconds,
                            eager_calls=behind.eager_calls)
            notify("model.compiled", data)
        return True
    accelerated.failed[shape] = error
    log.warning("the compiled call of %s for %s failed (%s); made eagerly, and this shape stays eager", model_id,
                shape, error)
    notify("model.compile_failed", {**described, "error": error})
    call()
    return False


def _eagerly_while_compiling(accelerated: Accelerated, shape: Shape, call: Callable[[], None],
                             notify: Callable[[str, dict], None], described: dict) -> None:
    """An eager call of a shape whose compile is under way, or the shape's first call, whose
    modules' inputs start its compile in the background once the call is made."""
    behind = accelerated.behind.get(shape)
    if behind is not None:
        behind.eager_calls += 1
        call()
        return
    inputs, unhook = record_inputs(accelerated.eager)
    try:
        call()
    finally:
        unhook()
    if not inputs:  # the call used none of the modules (a cancelled call, say): the next one tries
        return
    behind = accelerated.behind[shape] = Behind(accelerated, shape, inputs)
    notify("model.compile_started", {**described, "background": True, "mode": accelerated.mode,
                                     "backend": accelerated.backend, "modules": sorted(inputs)})
    behind.thread.start()
