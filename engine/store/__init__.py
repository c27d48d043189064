"""Persistence: the append-only event log, its projections, the dialect hooks, and the store's
own errors (drivers' errors are translated here and go no further)."""

from engine.store.errors import StoreBusy, StoreConflict, StoreError, StoreUnavailable, UniqueViolation, first_line
from engine.store.eventstore import STORE_ERRORS, Store, Tx, is_lost_connection
from engine.store.events import Event, now_iso

__all__ = ["Event", "STORE_ERRORS", "Store", "StoreBusy", "StoreConflict", "StoreError", "StoreUnavailable", "Tx",
           "UniqueViolation", "first_line", "is_lost_connection", "now_iso"]
