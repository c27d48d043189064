"""The engine's exceptions, each carrying a stable error code of the user-facing contract."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Base of every error the engine reports to a user; `code` is a contract string."""

    code = "STEP_FAILED"
    exit_code = 1
    retryable = True

    def __init__(self, message: str, details: list[Any] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "details": self.details}
        body.update(self.extra)
        return body


class ValidationError(EngineError):
    code = "VALIDATION_ERROR"
    exit_code = 2
    retryable = False


class UnknownWorkflow(ValidationError):
    code = "UNKNOWN_WORKFLOW"


class UnknownModel(ValidationError):
    code = "UNKNOWN_MODEL"


class UnsafePath(ValidationError):
    code = "UNSAFE_PATH"


class UnsafeModelFormat(ValidationError):
    code = "UNSAFE_MODEL_FORMAT"


class DuplicateJob(ValidationError):
    code = "DUPLICATE_JOB"


class QuotaExceeded(EngineError):
    """An owner's max_pending would be passed: nothing of the job is recorded."""

    code = "QUOTA_EXCEEDED"
    exit_code = 2
    retryable = False


class RateLimited(EngineError):
    """An owner's submissions a minute ([owners.NAME] rate) are used up; `retry_after` seconds."""

    code = "RATE_LIMITED"
    exit_code = 2
    retryable = False

    def __init__(self, message: str, retry_after: int, details: list[Any] | None = None) -> None:
        super().__init__(message, details, retry_after=retry_after)
        self.retry_after = retry_after


class Forbidden(EngineError):
    """What these credentials may not do (submit as another owner)."""

    code = "FORBIDDEN"
    exit_code = 2
    retryable = False


class NotFound(EngineError):
    code = "NOT_FOUND"
    exit_code = 3
    retryable = False


class InvalidTransition(EngineError):
    code = "INVALID_TRANSITION"
    exit_code = 4
    retryable = False


class OutOfMemory(EngineError):
    """Transient: other work may have freed the memory by the next attempt."""

    code = "OUT_OF_MEMORY"


class WillNotFit(OutOfMemory):
    """Refused before trying: the work needs more memory than the device has at all."""

    retryable = False


class DeviceUnavailable(EngineError):
    code = "DEVICE_UNAVAILABLE"


class ModelLoadFailed(EngineError):
    code = "MODEL_LOAD_FAILED"


class StepFailed(EngineError):
    code = "STEP_FAILED"


class Timeout(EngineError):
    code = "TIMEOUT"


class Cancelled(EngineError):
    """Raised inside a handler when its cancellation token fires; not a failure of the step."""

    code = "CANCELLED"
    retryable = False


class StaleLease(EngineError):
    """A runner tried to record a result for a step it no longer owns (fencing)."""

    code = "STEP_FAILED"
    retryable = False
