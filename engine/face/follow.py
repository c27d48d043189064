"""Following the event log, for doors: the store's one Follower (engine.store.follow), which the
HTTP door's event streams, the stdio worker's pushes and every wait use."""

from engine.store.follow import Follower

__all__ = ["Follower"]
