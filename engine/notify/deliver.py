"""Sending deliveries: each runner's deliverer looks for deliveries that are due, claims each with
a `delivery.sending` event (its lease: not due again until the send has had its time, so a
runner killed mid-send leaves it to be sent again), sends it on a small pool of its own threads
(never the claim loop's), and records the outcome as `delivery.attempted`: delivered, pending
with its next attempt (backoff with jitter), or dead.

A delivery is a POST of JSON `{"type", "timestamp", "data"}` (data: the event and the session's
or batch's report, the read API's shape) with Standard Webhooks' headers: `webhook-id` (the same
for every attempt of one delivery), `webhook-timestamp` and `webhook-signature`."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine import metrics, queries
from engine.ending import ENDED_SESSION
from engine.errors import EngineError
from engine.notify import rules
from engine.store.errors import StoreError
from engine.store.events import epoch_of

log = logging.getLogger("engine.notify")
KEPT_ANSWER = 1024  # bytes of a receiver's answer kept in the log
RESULT_WAIT_SECONDS = 10.0


@dataclass
class Answer:
    status: int | None
    error: str | None
    text: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def signed_headers(secret: str, delivery_id: str, payload: str, when: datetime) -> dict[str, str]:
    """Standard Webhooks' three headers for one attempt."""
    from standardwebhooks.webhooks import Webhook

    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(delivery_id, when, payload),
            "content-type": "application/json", "user-agent": "engine-webhooks"}


def refused_target(url: str, allow_private: bool) -> str | None:
    """Why this URL may not be sent to: its host resolves to an address `rules.address_refused`
    refuses (every address it resolves to is checked), or does not resolve."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http or https URL"
    try:
        found = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"{parts.hostname} does not resolve: {exc}"
    for *_, address in found:
        why = rules.address_refused(address[0], allow_private)
        if why:
            return why
    return None


def send(url: str, payload: str, headers: dict[str, str], timeout: float) -> Answer:
    """One POST: redirects not followed, a connect and read timeout, at most 1 KiB of the answer."""
    import httpx

    try:
        with httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False) as client:
            with client.stream("POST", url, content=payload.encode(), headers=headers) as response:
                kept = b""
                for chunk in response.iter_bytes():
                    kept += chunk
                    if len(kept) >= KEPT_ANSWER:
                        break
                return Answer(response.status_code, None if 200 <= response.status_code < 300
                              else f"HTTP {response.status_code}", kept[:KEPT_ANSWER].decode("utf-8", "replace"))
    except httpx.TimeoutException as exc:
        return Answer(None, f"timed out after {timeout:g} s ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return Answer(None, f"{type(exc).__name__}: {exc}"[:500])


class Deliverer:
    """Sends the deliveries that are due, for one runner."""

    def __init__(self, engine, runner_id: str) -> None:
        notify = engine.config.values["notify"]
        self.engine, self.store, self.runner_id = engine, engine.store, runner_id
        self.policy = rules.Policy.from_config(engine.config)
        self.secret = str(notify["secret"] or "")
        self.timeout = float(notify["timeout_seconds"])
        self.concurrency = max(1, int(notify["concurrency"]))
        self.poll = float(notify["poll_seconds"])
        self.allow_private = bool(notify["allow_private"])
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="engine-webhook")
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self._said_no_secret = False

    # the loop ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="engine-webhooks", daemon=True)
        self.thread.start()

    def stop(self, wait: float = 5.0) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=wait)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self.stopping.wait(self.poll):
            try:
                self.send_due()
            except StoreError as exc:  # the database's trouble: the next look tries again
                log.warning("webhook deliveries: %s", exc.message)
            except Exception:  # noqa: BLE001 - a bug: logged whole; the runner's other work goes on
                log.exception("webhook deliveries: the next look tries again")

    def send_due(self, wait: bool = False) -> int:
        """Claim and start sending what is due now (as many as the pool has room for); with
        `wait`, until those sends are recorded. Returns how many were started."""
        if not self.secret:
            if not self._said_no_secret and self._due(1):
                log.error("webhook deliveries wait: [notify] secret is not set (engine notify new-secret makes one)")
                self._said_no_secret = True
            return 0
        with self.lock:
            room = self.concurrency - len(self.in_flight)
        started = []
        for delivery_id in self._due(room) if room > 0 else []:
            claimed = self._claim(delivery_id)
            if claimed is None:
                continue
            with self.lock:
                self.in_flight.add(delivery_id)
            started.append(self.pool.submit(self._send_one, claimed))
        if wait:
            for future in started:
                future.result()
        return len(started)

    def _due(self, limit: int) -> list[str]:
        due = queries.due_deliveries(self.store, limit, time.time())
        with self.lock:
            return [delivery_id for delivery_id in due if delivery_id not in self.in_flight]

    def _claim(self, delivery_id: str) -> dict[str, Any] | None:
        """delivery.sending, if it is still due (another runner may have taken it)."""
        def claim(tx) -> dict[str, Any] | None:
            row = tx.get("deliveries", (delivery_id,))
            now = time.time()
            if row is None or row["status"] != "pending" or (row["next_attempt_at"] or 0) > now:
                return None
            attempt = row["attempts"] + 1
            tx.emit("delivery", delivery_id, "delivery.sending", {
                "delivery_id": delivery_id, "attempt": attempt, "runner_id": self.runner_id,
                "until": now + 2 * self.timeout + 5})
            return {**row, "attempts": attempt}

        return self.store.write(claim)

    # one attempt -------------------------------------------------------------------------------

    def _send_one(self, row: dict[str, Any]) -> None:
        try:
            started = time.monotonic()
            refused = refused_target(row["url"], self.allow_private)
            if refused:
                answer = Answer(None, f"refused: {refused}")
            else:
                payload = json.dumps(self.body(row), default=str)
                headers = signed_headers(self.secret, row["delivery_id"], payload, datetime.now(timezone.utc))
                answer = send(row["url"], payload, headers, self.timeout)
            self._record(row, answer, time.monotonic() - started, permanent=bool(refused))
        except Exception:
            log.exception("delivery %s: attempt %d could not be recorded; it is sent again when due",
                          row["delivery_id"], row["attempts"])
        finally:
            with self.lock:
                self.in_flight.discard(row["delivery_id"])

    def body(self, row: dict[str, Any]) -> dict[str, Any]:
        """What a receiver is sent: the event, and its session's or batch's report now."""
        data: dict[str, Any] = {"event_id": row["event_id"], "event_type": row["event_type"],
                                "target_type": row["target_type"], "target_id": row["target_id"]}
        try:
            if row["target_type"] == "session":
                report = queries.session_report(self.store, self.engine.outbox, row["target_id"])
                # An ended session's result.json (its images) is written just after the commit
                # that ended it: a body that lists the images waits for it, a while.
                result = Path(report["outbox"]) / "result.json"
                if row["event_type"] in ENDED_SESSION and not result.exists():
                    waited = time.monotonic()
                    while not result.exists() and time.monotonic() - waited < RESULT_WAIT_SECONDS \
                            and not self.stopping.is_set():
                        time.sleep(0.05)
                    report = queries.session_report(self.store, self.engine.outbox, row["target_id"])
                base = str(self.engine.config.get("notify", "public_url") or "").rstrip("/")
                if base:
                    report["image_urls"] = [f"{base}/v1/sessions/{row['target_id']}/images/{n}"
                                            for n in range(len(report["images"]))]
            else:
                report = queries.batch_report(self.store, row["target_id"])
            data[row["target_type"]] = report
        except EngineError as exc:  # deleted since: the event is still reported
            data["error"] = {"code": exc.code, "message": exc.message}
        return {"type": row["event_type"], "timestamp": row["created_at"], "data": data}

    def _record(self, row: dict[str, Any], answer: Answer, seconds: float, permanent: bool) -> None:
        delivery_id, attempt = row["delivery_id"], row["attempts"]

        def record(tx) -> str:
            now = time.time()
            current = tx.get("deliveries", (delivery_id,))
            current = current or row
            tries = attempt - current["retry_base"]  # attempts since the last retry by hand
            if answer.delivered:
                outcome, next_at = "delivered", None
            elif permanent or rules.is_dead(tries, now - epoch_of(current["created_at"]), self.policy):
                outcome, next_at = "dead", None
            else:
                outcome, next_at = "pending", now + rules.backoff(tries, self.policy)
            tx.emit("delivery", delivery_id, "delivery.attempted", {
                "delivery_id": delivery_id, "attempt": attempt, "outcome": outcome, "status": answer.status,
                "error": answer.error, "answer": answer.text, "seconds": round(seconds, 3), "next_attempt_at": next_at})
            return outcome

        outcome = self.store.write(record)
        note = log.info if outcome == "delivered" else log.warning
        note("delivery %s (%s of %s %s) to %s: attempt %d %s%s", delivery_id, row["event_type"], row["target_type"],
             row["target_id"], row["url"], attempt, outcome, f" ({answer.error})" if answer.error else "")
        metrics.WEBHOOKS.labels(outcome=outcome).inc()


def retry(store, delivery_id: str) -> list:
    """`engine notify retry ID`: a dead (or pending) delivery is due again now, with a fresh
    budget of attempts. NOT_FOUND for an unknown id, INVALID_TRANSITION for a delivered one."""
    from engine.errors import InvalidTransition, NotFound

    def record(tx) -> None:
        row = tx.get("deliveries", (delivery_id,))
        if row is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        if row["status"] == "delivered":
            raise InvalidTransition(f"delivery {delivery_id} was delivered", current_state="delivered")
        tx.emit("delivery", delivery_id, "delivery.retried", {"delivery_id": delivery_id, "next_attempt_at": time.time()})

    return store.write_events(record)[1]
