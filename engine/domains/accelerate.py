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
With `[compile] background` (off by default) it need not hold images up either: a shape not yet
compiled is compiled by `engine warmup` in a process of its own (its own interpreter, so the calls
that go on eagerly meanwhile do not wait for it), which fills this machine's caches; the first
call after that process ends switches to the compiled path, compiling from the caches
(`model.compile_started`, then `model.compiled` with `background: true`, the compile's seconds and
the eager calls made meanwhile). A shape compiled once on this machine (by a runner or `engine
warmup`, noted beside the caches for the model's file hash) compiles from the caches in the
foreground in a later process. `engine warmup` compiles in the foreground.

`[compile] scope = "regional"` compiles only the denoiser's repeated blocks (diffusers'
`_repeated_blocks`: the SDXL UNet's 70 transformer blocks are one graph per kind of block and
call size, traced once and shared by every block of that kind) and the VAE decoder: a fraction of
the whole UNet's compile, so a new process with the caches present is compiled in seconds. They
compile without CUDA graphs (`regional_mode`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("engine.compile")

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCOPES = ("whole", "regional")
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
    cache: Path  # torch's caches (inductor's) and the note of which shapes compiled here
    done: set = field(default_factory=set)  # shapes that ran compiled
    failed: dict = field(default_factory=dict)  # shape -> why it runs eagerly
    scope: str = "whole"  # or "regional": the denoiser's repeated blocks only
    background: Callable[[Shape], "Behind"] | None = None  # starts a shape's compile in another process
    behind: dict = field(default_factory=dict)  # shape -> its Behind (a background compile)
    # The device's free bytes now, and the model's weights: whether another process has room.
    free_bytes: Callable[[], int] | None = None
    weights_bytes: int = 0
    fingerprint: str = ""  # the model's file hash and dtype: what the caches of a shape are for

    def marker(self, shape: Shape) -> Path | None:
        """The file that says this shape of this model was compiled on this machine (its caches
        are in `cache`): written after its first compiled call, by any process."""
        if not self.fingerprint:
            return None
        mode, images, width, height = shape
        name = f"{self.fingerprint}-{self.scope}-{self.mode}-{self.backend}-{mode}-{images}x{width}x{height}"
        return self.cache / "compiled" / re.sub(r"[^A-Za-z0-9.=-]+", "_", name)

    def cached(self, shape: Shape) -> bool:
        marker = self.marker(shape)
        return marker is not None and marker.exists()

    def mark(self, shape: Shape) -> None:
        marker = self.marker(shape)
        if marker is not None:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError as exc:  # the next process compiles this shape in the background again
                log.warning("could not note the compiled shape in %s: %s", marker, exc)

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
    """A background compile of one shape: `command` (an `engine warmup` of the model for that
    shape) in a process of its own, which writes this machine's compile caches. Its output is kept
    in a file; the process ends with this one (it is killed when the runner exits)."""

    def __init__(self, command: list[str], env: dict[str, str], log_file: Path) -> None:
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self.error: str | None = None
        self.eager_calls = 0
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "wb") as output:
            self.process = subprocess.Popen(_dying_with_parent(command), env=env, stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT)
        _BEHIND.append(self)

    def done(self) -> bool:
        """Whether the process has ended (its seconds or its error then known)."""
        if self.seconds is not None or self.error is not None:
            return True
        code = self.process.poll()
        if code is None:
            return False
        if code == 0:
            self.seconds = round(time.perf_counter() - self.started, 3)
        else:
            said = [line for line in self.log_file.read_text(errors="replace").splitlines() if line.strip()]
            self.error = f"the background compile exited with {code}: {' / '.join(said[-2:])[:400]}"
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_BEHIND: list[Behind] = []  # every background compile of this process, stopped when it exits


def stop_background_compiles() -> None:
    for behind in _BEHIND:
        behind.stop()


# Run first in the child (no preexec_fn: not safe in a process with threads): on Linux, ask to be
# killed when the thread that started it ends (the runner's long-lived handler thread, or the
# runner itself, even by SIGKILL), then become the command.
_LAUNCH = ("import ctypes, os, signal, sys\n"
           "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
           "except Exception:\n    pass\n"
           "os.execv(sys.argv[1], sys.argv[1:])")


def _dying_with_parent(command: list[str]) -> list[str]:
    return [sys.executable, "-c", _LAUNCH, *command] if sys.platform.startswith("linux") else command


# A background compile loads its own copy of the model and runs calls of the shape it compiles:
# room for it is the weights and as much again (a call's activations and the compiler's own).
BACKGROUND_ROOM = 2.0


def background_room(free_bytes: int, weights_bytes: int, running: int) -> str:
    """Whether a shape's compile may start in another process now: "start" when the device has room
    for one more copy of the model and its calls (BACKGROUND_ROOM times its weights), else "wait"
    while another background compile runs (its memory comes back when it ends), else "foreground"
    (there is never room: the shape compiles in this process, as with background off)."""
    if free_bytes >= BACKGROUND_ROOM * weights_bytes:
        return "start"
    return "wait" if running else "foreground"


def warmup_elsewhere(config, model_id: str, device_index: int | None) -> Callable[[Shape], Behind]:
    """What starts a shape's background compile: `engine warmup MODEL` for that one shape, on the
    same installation and GPU (CUDA_VISIBLE_DEVICES), in a process of its own."""
    import atexit

    atexit.register(stop_background_compiles)

    def start(shape: Shape) -> Behind:
        _, images, width, height = shape
        command = [sys.executable, "-m", "engine"] + (["--config", str(config.source)] if config.source else []) + [
            "warmup", model_id, "--sizes", f"{width}x{height}", "--batch-sizes", str(images), "--steps", "2"]
        env = dict(os.environ)
        if device_index is not None:
            visible = env.get("CUDA_VISIBLE_DEVICES")
            listed = [v.strip() for v in visible.split(",")] if visible else None
            env["CUDA_VISIBLE_DEVICES"] = listed[device_index] if listed and device_index < len(listed) else str(device_index)
        folder = config.base_dir / "logs"
        return Behind(command, env, folder / f"compile-{model_id}-{images}x{width}x{height}-{os.getpid()}.log")

    return start


def _described(exc: BaseException) -> str:
    """The error and its root cause, one line each at most: torch wraps a backend's error."""
    parts, seen = [], exc
    while seen is not None and len(parts) < 3:
        first = next((line.strip() for line in str(seen).splitlines() if line.strip()), "")
        parts.append(f"{type(seen).__name__}: {first}")
        seen = seen.__cause__ or getattr(seen, "inner_exception", None)
    return "; caused by ".join(parts)[:500]


def _set(pipe, name: str, module) -> None:
    """Put `module` at the dotted path `name` below `pipe` ("unet", "vae.decoder",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0")."""
    owner, _, attribute = name.rpartition(".")
    parent = functools.reduce(getattr, owner.split("."), pipe) if owner else pipe
    setattr(parent, attribute, module)


def repeated_blocks(denoiser) -> dict[str, Any]:
    """The denoiser's repeated blocks (diffusers' `_repeated_blocks`), by their dotted path below it."""
    kinds = set(getattr(denoiser, "_repeated_blocks", None) or ())
    return {name: module for name, module in denoiser.named_modules() if name and type(module).__name__ in kinds}


def regional_mode(mode: str) -> str:
    """The mode repeated blocks compile in: `mode` without CUDA graphs. Every block of a kind replays
    one compiled graph, so a CUDA graph would overwrite the output one block hands the next (torch
    refuses to read it): reduce-overhead becomes default, max-autotune max-autotune-no-cudagraphs."""
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def prepare(pipe, config, gpu_name: str, fingerprint: str = "") -> Accelerated:
    """channels_last on the pipeline's denoiser and VAE, and their compiled twins (compiled by
    torch at their first call of each shape)."""
    import torch

    mode, backend = str(config.get("compile", "mode")), str(config.get("compile", "backend"))
    if mode not in MODES:
        raise ValueError(f"[compile] mode {mode!r}: one of {', '.join(MODES)}")
    cache = cache_folder(config, gpu_name, torch.__version__)  # inductor's caches, and which shapes compiled
    if backend == "inductor":
        use_cache(cache)
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    for module in (getattr(pipe, denoiser), pipe.vae):
        module.to(memory_format=torch.channels_last)
    scope = str(config.get("compile", "scope"))
    if scope not in SCOPES:
        raise ValueError(f"[compile] scope {scope!r}: one of {', '.join(SCOPES)}")
    blocks = repeated_blocks(getattr(pipe, denoiser)) if scope == "regional" else {}
    if scope == "regional" and not blocks:
        log.warning("%s has no repeated blocks to compile regionally; it is compiled whole", denoiser)
        scope = "whole"
    if blocks:
        # One graph per kind of block and call size, shared by its blocks; more than dynamo's
        # default room for one function's graphs (8) once there are several sizes.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        without_graphs = regional_mode(mode)
        if without_graphs != mode:
            log.info("[compile] mode %s: the regional scope compiles without CUDA graphs (%s)", mode, without_graphs)
            mode = without_graphs
        eager = {f"{denoiser}.{name}": module for name, module in blocks.items()}
    else:
        eager = {denoiser: getattr(pipe, denoiser)}
    eager["vae.decoder"] = pipe.vae.decoder
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
                       mode, backend, cache, scope=scope,
                       fingerprint=f"{fingerprint[:16]}-{numbers_of(pipe, denoiser)}" if fingerprint else "")


def numbers_of(pipe, denoiser: str) -> str:
    """The pipeline's number format as its compiled graphs see it: its dtype, and float8's scaling."""
    from engine.domains.float8 import scaling_of

    scaling = scaling_of(getattr(pipe, denoiser))
    return str(pipe.dtype).removeprefix("torch.") + (f"-fp8-{scaling}" if scaling else "")


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
    # In the background: a shape this process has not run compiled, whose compile is under way
    # elsewhere or whose caches are not known to be here.
    behind = accelerated.behind.get(shape)
    if accelerated.background and shape not in accelerated.done and (behind or not accelerated.cached(shape)):
        if behind is None or not behind.done():
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
            accelerated.mark(shape)
            data = {**described, "seconds": round(time.perf_counter() - started, 3), "mode": accelerated.mode,
                    "backend": accelerated.backend, "scope": accelerated.scope,
                    "cache": str(accelerated.cache)}
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
    """An eager call of a shape whose compile is under way elsewhere; the shape's first call
    starts that compile (`model.compile_started`) before it is made."""
    behind = accelerated.behind.get(shape)
    if behind is None:
        room = "start"
        if accelerated.free_bytes is not None:
            free = accelerated.free_bytes()
            running = sum(1 for other in accelerated.behind.values() if not other.done())
            room = background_room(free, accelerated.weights_bytes, running)
        if room == "wait":  # another compile holds the room it needs: this call goes on eagerly
            call()
            return
        if room == "foreground":
            _in_the_foreground(accelerated, shape, call, (
                f"the device has too little free memory for a second copy of the model ({free / 2**30:.1f} GiB "
                f"free, {BACKGROUND_ROOM * accelerated.weights_bytes / 2**30:.1f} GiB wanted)"))
            return
        try:
            behind = accelerated.behind[shape] = accelerated.background(shape)
        except OSError as exc:  # no process could be started
            _in_the_foreground(accelerated, shape, call, str(exc))
            return
        notify("model.compile_started", {**described, "background": True, "mode": accelerated.mode,
                                         "backend": accelerated.backend, "scope": accelerated.scope,
                                         "pid": behind.process.pid, "log": str(behind.log_file)})
    behind.eager_calls += 1
    call()


def _in_the_foreground(accelerated: Accelerated, shape: Shape, call: Callable[[], None], why: str) -> None:
    """No background compile after all: this call is made eagerly, and from the next one on every
    shape compiles in this process, as with `[compile] background` off."""
    log.warning("could not start a background compile (%s); %s compiles in the foreground", why, shape)
    accelerated.background = None
    call()
