"""Prometheus metrics (prometheus-client), in its naming conventions. Two kinds:

- Read from the store at each scrape, so true across processes and hosts: sessions and batches
  by status, the oldest pending session's wait, runners by status and their heartbeat age, each
  worker's device memory (as of its heartbeat), webhook deliveries by status.
- Counted in this process (their help text says so): steps by domain and outcome and their
  durations, images by model, how many images a pipeline call made and how long it took, inbox
  files by outcome, webhook attempts by outcome.

`engine serve` answers GET /metrics; `engine run --metrics-port N` serves it on its own port."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from engine.machines import SESSION_STATUSES
from engine.store.errors import StoreError
from engine.store.events import epoch_of

REGISTRY = CollectorRegistry()
THIS_PROCESS = " (counted by this process)"

STEPS = Counter("engine_steps", "Step attempts by domain and outcome" + THIS_PROCESS, ["domain", "outcome"],
                registry=REGISTRY)
STEP_SECONDS = Histogram("engine_step_duration_seconds", "How long a completed step's handler took" + THIS_PROCESS,
                         ["domain"], registry=REGISTRY,
                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
IMAGES = Counter("engine_images", "Images made by a completed inference step, by model" + THIS_PROCESS, ["model"],
                 registry=REGISTRY)
CALL_IMAGES = Histogram("engine_call_images", "Images made by one pipeline call: how well calls coalesce"
                        + THIS_PROCESS, registry=REGISTRY, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
CALL_SECONDS = Histogram("engine_call_seconds", "How long one pipeline call took" + THIS_PROCESS,
                         ["model", "compiled"], registry=REGISTRY,
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300))
INBOX = Counter("engine_inbox_files", "Inbox files by outcome" + THIS_PROCESS, ["outcome"], registry=REGISTRY)
WEBHOOKS = Counter("engine_webhook_deliveries", "Webhook delivery attempts by outcome (delivered, pending: to be "
                   "tried again, dead)" + THIS_PROCESS, ["outcome"], registry=REGISTRY)


def step_completed(domain: str, seconds: float, data: dict, images: int) -> None:
    STEPS.labels(domain=domain, outcome="completed").inc()
    STEP_SECONDS.labels(domain=domain).observe(seconds)
    if domain == "inference" and images:
        IMAGES.labels(model=str(data.get("model") or "")).inc(images)


def call_made(data: dict) -> None:
    """One pipeline call (a coalesced call serves several steps: counted once)."""
    if data.get("call_images"):
        CALL_IMAGES.observe(data["call_images"])
        CALL_SECONDS.labels(model=str(data.get("model") or ""), compiled=str(bool(data.get("compiled"))).lower()) \
            .observe(float(data.get("group_seconds") or 0.0))


class StoreCollector:
    """The store's figures, read at each scrape (one short read)."""

    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        up = GaugeMetricFamily("engine_store_up", "Whether the store answered this scrape")
        try:
            families = list(self._read())
        except StoreError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self):
        from engine import queries

        now = time.time()
        found = queries.figures(self.store)
        sessions, batches, deliveries = found["sessions"], found["batches"], found["deliveries"]
        oldest, runners = found["oldest_pending"], found["runners"]
        family = GaugeMetricFamily("engine_sessions", "Sessions by status (from the store)", labels=["status"])
        for status in SESSION_STATUSES:
            family.add_metric([status], sessions.get(status, 0))
        yield family
        family = GaugeMetricFamily("engine_batches", "Batches by status (from the store)", labels=["status"])
        for status in SESSION_STATUSES:
            family.add_metric([status], batches.get(status, 0))
        yield family
        family = GaugeMetricFamily("engine_queue_oldest_pending_seconds",
                                   "How long the oldest pending session has waited (0: none waits)")
        family.add_metric([], max(0.0, now - epoch_of(oldest)) if oldest else 0.0)
        yield family
        family = GaugeMetricFamily("engine_webhook_deliveries_by_status",
                                   "Webhook deliveries by status (from the store)", labels=["status"])
        for status in ("pending", "delivered", "dead"):
            family.add_metric([status], deliveries.get(status, 0))
        yield family
        counts = GaugeMetricFamily("engine_runners", "Registered runners by status", labels=["status"])
        for status in ("running", "stopped", "gone"):
            counts.add_metric([status], sum(1 for r in runners if r["status"] == status))
        yield counts
        age = GaugeMetricFamily("engine_runner_heartbeat_age_seconds", "Seconds since a running runner's last "
                                "heartbeat", labels=["runner"])
        memory = GaugeMetricFamily("engine_gpu_memory_bytes", "A worker's device memory in use as of its runner's "
                                   "last heartbeat (torch's allocated memory on a GPU; the process's on a CPU)",
                                   labels=["runner", "device"])
        total = GaugeMetricFamily("engine_device_memory_total_bytes", "A worker's device memory in all",
                                  labels=["runner", "device"])
        for runner in runners:
            if runner["status"] != "running":
                continue
            age.add_metric([runner["runner_id"]], max(0.0, now - epoch_of(runner["last_heartbeat"])))
            for worker, figures in (runner.get("memory") or {}).items():
                if isinstance(figures, dict) and figures.get("used") is not None:
                    memory.add_metric([runner["runner_id"], worker], figures["used"])
                    if figures.get("total"):
                        total.add_metric([runner["runner_id"], worker], figures["total"])
        yield age
        yield memory
        yield total


def registry_for(store) -> CollectorRegistry:
    """This process's counters and the store's figures, in one registry to expose."""
    registry = CollectorRegistry()
    registry.register(_Forward(REGISTRY))
    registry.register(StoreCollector(store))
    return registry


class _Forward:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        yield from self.registry.collect()


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_metrics(store, port: int, host: str = "127.0.0.1"):
    """`engine run --metrics-port`: /metrics on a port of its own (a daemon thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=registry_for(store))
