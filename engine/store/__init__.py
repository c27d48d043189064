"""Persistence: the append-only event log, its projections, and the dialect hooks."""

from engine.store.eventstore import STORE_ERRORS, Store, StoreUnavailable, Tx, is_lost_connection
from engine.store.events import Event, now_iso

__all__ = ["Event", "Store", "Tx", "now_iso"]
