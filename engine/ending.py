"""A session's end, in one place: the rule by which it completes, how it fails, and what its end
tells its batch (the item ends; the batch completes with its last item). Every write that ends a
session or batch goes through here; result.json and summary.json follow from the committed events
(engine.outbox.results, the store's after-commit hook), whoever made the write.
"""

from __future__ import annotations

import json

from engine.machines import ITEM, TERMINAL
from engine.store import Tx

ENDED_SESSION = ("session.completed", "session.failed", "session.cancelled")
ENDED_BATCH = ("batch.completed", "batch.failed", "batch.cancelled")


def complete_if_done(tx: Tx, session_id: str) -> bool:
    """A running session whose every step completed completes (at its last step's record, or when
    it is resumed after a pause during its last step). True when it did."""
    session = tx.get("sessions", (session_id,))
    if session is None or session["status"] != "running" or session["current_step"] < session["total_steps"]:
        return False
    tx.emit("session", session_id, "session.completed", {"session_id": session_id, "run": session["run"]})
    item_ended(tx, session_id, "completed")
    return True


def fail(tx: Tx, session_id: str, run: int, step_index: int, code: str, message: str) -> bool:
    """A step failed for good: its session fails with the step's code and message. True if it ended."""
    session = tx.get("sessions", (session_id,))
    if session["status"] not in ("running", "pending"):
        return False
    step_type = json.loads(session["steps"])[step_index]["type"]
    tx.emit("session", session_id, "session.failed", {
        "session_id": session_id, "run": run, "code": code,
        "message": f"step {step_index} ({step_type}): {message}"[:2000],
    })
    item_ended(tx, session_id, "failed")
    return True


def cancel_session(tx: Tx, session_id: str, run: int) -> None:
    """A session cancelled by request (the caller checked that it may be)."""
    tx.emit("session", session_id, "session.cancelled",
            {"session_id": session_id, "run": run, "code": "CANCELLED", "message": "cancelled by request"})
    item_ended(tx, session_id, "cancelled")


def cancel_batch(tx: Tx, batch_id: str, run: int) -> None:
    """A batch cancelled by request (its items are cancelled one by one by the caller)."""
    tx.emit("batch", batch_id, "batch.cancelled", {"batch_id": batch_id, "run": run})


def item_ended(tx: Tx, session_id: str, status: str) -> None:
    """Tell a session's batch (if any) that its item ended; the batch completes with its last item."""
    session = tx.get("sessions", (session_id,))
    if session is None or not session["batch_id"]:
        return
    batch_id, index = session["batch_id"], session["item_index"]
    item = tx.get("items", (batch_id, index))
    trigger = {"completed": "complete", "failed": "fail", "cancelled": "cancel"}[status]
    if item and ITEM.allowed(trigger, item["status"]):
        tx.emit("batch", batch_id, ITEM.event(trigger), {"batch_id": batch_id, "item_index": index,
                                                         "session_id": session_id})
    batch = tx.get("batches", (batch_id,))
    ended = batch["completed_items"] + batch["failed_items"] + batch["cancelled_items"]
    if batch["status"] not in TERMINAL and ended == batch["total_items"]:
        tx.emit("batch", batch_id, "batch.completed", {
            "batch_id": batch_id, "completed_items": batch["completed_items"], "failed_items": batch["failed_items"],
            "cancelled_items": batch["cancelled_items"],
        })
