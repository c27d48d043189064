"""Following the event log: what every reader of "what happened since" uses (the HTTP door's event
streams, the stdio worker's pushes, the runner's lines for controls, a wait for a session's end)."""

from __future__ import annotations

from typing import Any


class Follower:
    """Each `new()` answers the events committed since the last look, oldest first, as dicts (of
    some `types` and `streams`, when given). `after` None: from now."""

    def __init__(self, store, after: int | None = None, types: tuple[str, ...] | None = None,
                 streams: set[str] | None = None) -> None:
        self.store, self.types, self.streams = store, types, streams
        self.last = store.newest_event_id() if after is None else after

    def new(self, limit: int = 1000) -> list[dict[str, Any]]:
        found = self.store.events_after(self.last, limit, self.types, self.streams)
        if found:
            self.last = found[-1].event_id
        return [e.as_dict() for e in found]

    def skip_to_now(self) -> None:
        self.last = self.store.newest_event_id()
