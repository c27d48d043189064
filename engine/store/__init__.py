"""Persistence: the append-only event log, its projections, and the dialect hooks."""

from engine.store.eventstore import Store, Tx
from engine.store.events import Event, now_iso

__all__ = ["Event", "Store", "Tx", "now_iso"]
