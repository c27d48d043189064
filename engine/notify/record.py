"""Recording deliveries: a hook the store runs before each writing transaction commits. For every
event of that transaction that a job's notify (or the [notify] default) asks for, it appends a
`delivery.created` event to the same transaction: the event and its delivery commit together or
not at all, so a crash between the commit and the send loses nothing."""

from __future__ import annotations

import json
import time
import uuid

from engine.notify.rules import wanted

REPORTED_STREAMS = ("session", "batch")


class Recorder:
    def __init__(self, config) -> None:
        notify = config.values["notify"]
        self.default = {"url": notify["url"], "events": list(notify["events"])} if notify["url"] else None

    def __call__(self, tx) -> None:
        for event in list(tx.emitted):
            if event.stream_type not in REPORTED_STREAMS or event.type.startswith("delivery."):
                continue
            row = tx.get("sessions" if event.stream_type == "session" else "batches", (event.stream_id,))
            if row is None:  # deleted in this very transaction
                continue
            if event.stream_type == "session" and row.get("batch_id"):
                continue  # a batch's item: its batch reports it (item.completed, ...)
            own = json.loads(row["notify"]) if row.get("notify") else None
            url = wanted(event.type, own, self.default)
            if url is None:
                continue
            delivery_id = f"msg_{uuid.uuid4().hex}"
            tx.emit("delivery", delivery_id, "delivery.created", {
                "delivery_id": delivery_id, "event_id": event.event_id, "event_type": event.type,
                "target_type": event.stream_type, "target_id": event.stream_id, "url": url,
                "occurred_at": event.created_at, "next_attempt_at": time.time()})
