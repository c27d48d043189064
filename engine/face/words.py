"""The vocabulary doors speak, defined once below the face and named here: statuses (from the
state machines), controls, schedulers and AUTOMATIC1111's sampler names, key cases, the job
file's schema, event types."""

from engine.ingest.jobs import (ACTIONS, CASES, SAMPLER_NAMES, SCHEDULERS, job_schema, normalise_keys,  # noqa: F401
                                snake_case, to_case)
from engine.machines import ACTIVE, SESSION_STATUSES, TERMINAL  # noqa: F401
from engine.outbox.png import A1111_SAMPLERS  # noqa: F401
from engine.store.reducer import event_types  # noqa: F401


def for_the_page() -> dict:
    """What the page's script needs of the vocabulary (given to it as JSON, never copied into it)."""
    return {"ended": list(TERMINAL), "active": list(ACTIVE), "statuses": list(SESSION_STATUSES),
            "actions": list(ACTIONS)}


__all__ = ["A1111_SAMPLERS", "ACTIONS", "ACTIVE", "CASES", "SAMPLER_NAMES", "SCHEDULERS", "SESSION_STATUSES", "TERMINAL",
           "event_types", "for_the_page", "job_schema", "normalise_keys", "snake_case", "to_case"]
