"""Which failures are worth another attempt: one pure rule, `classify(error)`.

Errors that will fail the same way again (bad input, an unsafe path, a missing file, a model that
does not fit the pipeline) fail their step at once; transient ones (I/O, a locked database, out of
memory, a lost device) are retried with backoff. An error nobody foresaw is retried, as before.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from engine.errors import EngineError
from engine.store.errors import StoreError

# Words in a library's error that mean the inputs do not fit together (a LoRA or ControlNet of
# another model family, a tensor of the wrong shape): trying again cannot help.
MISMATCH_WORDS = ("size mismatch", "shape", "mat1 and mat2", "must match", "expected input", "dimension",
                  "is not iterable", "unexpected keyword", "missing 1 required")
DEVICE_WORDS = ("device-side assert", "cuda error", "device lost", "hip error", "dxgi", "no cuda gpus",
                "device not available")
PERMANENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
# How out-of-memory reads on each device: CUDA and MPS ("out of memory"), torch's CPU allocator,
# oneDNN on the CPU (a primitive whose memory cannot be allocated), and DirectML.
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough gpu video memory", "could not allocate tensor",
                "could not create a primitive")


def is_oom(error: BaseException) -> bool:
    """Whether an error means the device (or the host) ran out of memory; needs no torch import."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OOM_MESSAGES)


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    retryable: bool


def classify(error: BaseException) -> Failure:
    """The contract code, a one-line message, and whether another attempt may succeed."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, StoreError):  # the database's trouble (translated by the store), not the step's
        return Failure("STEP_FAILED", f"database error: {error.message}", True)
    if isinstance(error, EngineError):
        return Failure(error.code, error.message, error.retryable)
    if is_oom(error):
        return Failure("OUT_OF_MEMORY", text, True)
    if isinstance(error, OSError):
        if error.errno in PERMANENT_ERRNOS:
            return Failure("STEP_FAILED", f"a file is missing: {error}", False)
        return Failure("STEP_FAILED", f"I/O error: {error}", True)
    lowered = str(error).lower()
    if any(word in lowered for word in DEVICE_WORDS):
        return Failure("DEVICE_UNAVAILABLE", text, True)
    if isinstance(error, (TypeError, ValueError, KeyError, IndexError, AttributeError, NotImplementedError,
                          AssertionError, ZeroDivisionError)):
        return Failure("STEP_FAILED", f"{text} (not retried: it would fail the same way)", False)
    if isinstance(error, RuntimeError) and any(word in lowered for word in MISMATCH_WORDS):
        return Failure("STEP_FAILED", f"{text} (not retried: the inputs do not fit together)", False)
    return Failure("STEP_FAILED", text, True)
