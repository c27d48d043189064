"""Which steps may share one handler call, and how many images one call makes: pure rules.

A handler that can serve several steps at once (inference: one pipeline call for many images)
registers a *compatibility* function with its step type. At submit, each such step records a key:
a digest of its type, its template config and what that function says must be equal. Steps with
equal keys may run in one call; nothing else is needed to decide it, so the claim query finds a
leader's partners by the key alone.

`call_limit` says how many images a group claim may gather, from a batch's configuration or, for
single sessions coalesced across jobs, the `[batching]` defaults.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

Compatibility = Callable[[dict[str, Any], dict[str, Any]], Any]


def group_key(step_type: str, step_config: dict[str, Any], params: dict[str, Any],
              compatibility: Compatibility | None) -> str | None:
    """The step's key, or None when its handler serves one step at a time."""
    if compatibility is None:
        return None
    what = compatibility(step_config, params)
    if what is None:
        return None
    blob = json.dumps([step_type, step_config, what], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def images_of(params: dict[str, Any]) -> int:
    return max(1, int(params.get("num_images") or 1))


def call_limit(batch_config: dict[str, Any] | None, defaults: dict[str, Any],
               profile: dict[str, Any] | None = None) -> int:
    """The most images one call may make. A batch: its preferred size, never above its max; with
    dynamic_sizing and a memory profile measured for this model, size and mode, as many as fit in
    the memory a call had under the batch's memory_threshold (at least 1, at most max_batch_size).
    Coalesced single sessions: the `[batching]` max_batch_size."""
    if batch_config:
        maximum = int(batch_config.get("max_batch_size") or 1)
        if batch_config.get("dynamic_sizing") and profile and profile.get("per_image_bytes"):
            threshold = float(batch_config.get("memory_threshold") or 0.8)
            fit = int(profile["available_bytes"] * threshold // profile["per_image_bytes"])
            return max(1, min(maximum, fit))
        return max(1, min(int(batch_config.get("preferred_batch_size") or 1), maximum))
    return max(1, int(defaults.get("max_batch_size", 1)))


def take_partners(limit: int, leader_images: int, candidates: list[tuple[str, int]]) -> list[str]:
    """Which candidates (id, images), in queue order, join a leader's call without passing `limit`.
    A candidate too big for the room left is passed over, not waited for."""
    room = limit - leader_images
    taken = []
    for candidate_id, images in candidates:
        if images <= room:
            taken.append(candidate_id)
            room -= images
        if room <= 0:
            break
    return taken
