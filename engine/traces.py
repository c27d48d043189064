"""OpenTelemetry traces of sessions ([telemetry] traces, off by default; the `otel` extra).

When a write that ends a session commits (whichever process makes it: a runner, `engine serve`,
a control from the CLI), the session becomes one trace: a span from its creation to its end
(its id, job, workflow, owner, status and error) and, inside it, a child span for each attempt of
each of its steps (step type, domain, runner, worker, device, attempt, outcome, error code), timed
from the event log, so a step that ran in another process, or before a crash, is there too. The
spans are sent over OTLP/HTTP to [telemetry] endpoint by the SDK's batching processor in the
background: the commit never waits for them, and a collector that is away loses spans, never work.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from engine.ending import ENDED_SESSION

log = logging.getLogger("engine.traces")


def nanoseconds(moment: str | None) -> int | None:
    """The store's UTC time text ('2026-12-06 21:05:49.123456') as epoch nanoseconds."""
    if not moment:
        return None
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1_000_000) * 1000


def session_spans(report: dict[str, Any], timeline: list[dict[str, Any]]) -> tuple[dict, list[dict]]:
    """What the trace of one ended session holds, as plain data: the session span and its step
    spans (name, start and end in ns, attributes, error), from its report and its attempts.
    Only the attempts of the run that ended are its children."""
    run = report.get("run") or 1
    ended = nanoseconds(report.get("finished_at") or report.get("updated_at"))
    began = report.get("created_at") if run == 1 else report.get("started_at") or report.get("created_at")
    session = {
        "name": f"session {report.get('workflow_id')}",
        "start": nanoseconds(began), "end": ended,
        "attributes": _present({
            "engine.session.id": report["session_id"], "engine.job.id": report.get("job_id"),
            "engine.workflow": report.get("workflow_id"), "engine.owner": report.get("owner"),
            "engine.status": report.get("status"), "engine.run": run, "engine.batch.id": report.get("batch_id"),
            "engine.error.code": report.get("error_code")}),
        "error": (report.get("error_message") or report.get("error_code")) if report.get("status") == "failed" else None,
    }
    steps = []
    for attempt in timeline:
        if attempt.get("run", 1) != run:
            continue
        start = nanoseconds(attempt.get("started_at"))
        steps.append({
            "name": f"step {attempt['step_index']} {attempt.get('step_type', '?')}",
            "start": start, "end": nanoseconds(attempt.get("ended_at")) or ended or start,
            "attributes": _present({
                "engine.step.index": attempt["step_index"], "engine.step.type": attempt.get("step_type"),
                "engine.step.domain": attempt.get("domain"), "engine.step.attempt": attempt.get("attempt"),
                "engine.step.outcome": attempt.get("outcome"), "engine.runner.id": attempt.get("runner_id"),
                "engine.worker": attempt.get("worker"), "engine.device": attempt.get("device"),
                "engine.call.id": attempt.get("call_id"), "engine.call.images": attempt.get("call_images"),
                "engine.error.code": attempt.get("error_code")}),
            "error": attempt.get("error_message") if attempt.get("outcome") in ("failed", "retried") else None,
        })
    return session, steps


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class Traces:
    """The after-commit hook that turns each ended session into a trace, off the committing thread."""

    def __init__(self, config, store, outbox) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        telemetry = config.values["telemetry"]
        self.store, self.outbox = store, outbox
        self.provider = TracerProvider(resource=Resource.create({"service.name": telemetry["service_name"]}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=telemetry["endpoint"], timeout=float(telemetry["timeout_seconds"]))))
        self.tracer = self.provider.get_tracer("engine")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-traces")

    def after_commit(self, events) -> None:
        for event in events:
            if event.type in ENDED_SESSION and event.type != "session.deleted":
                self._pool.submit(self._trace, event.stream_id)

    def _trace(self, session_id: str) -> None:
        from engine import queries

        try:
            report = queries.session_report(self.store, self.outbox, session_id)
            timeline = queries.session_timeline(self.store, session_id)
        except Exception as exc:  # the database away, the session deleted meanwhile: no trace, said once
            log.warning("no trace for session %s: %s", session_id, exc)
            return
        self.emit(*session_spans(report, timeline))

    def emit(self, session: dict, steps: list[dict]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        root = self.tracer.start_span(session["name"], start_time=session["start"], attributes=session["attributes"])
        if session["error"]:
            root.set_status(Status(StatusCode.ERROR, str(session["error"])[:500]))
        inside = trace.set_span_in_context(root)
        for step in steps:
            child = self.tracer.start_span(step["name"], context=inside, start_time=step["start"],
                                           attributes=step["attributes"])
            if step["error"]:
                child.set_status(Status(StatusCode.ERROR, str(step["error"])[:500]))
            child.end(end_time=step["end"])
        root.end(end_time=session["end"])

    def flush(self) -> None:
        """Everything ended so far sent (at a runner's exit; the SDK also flushes at the process's)."""
        self._pool.submit(lambda: None).result()
        self.provider.force_flush()


def install(engine) -> None:
    """Add the hook to this engine's store when [telemetry] traces is on."""
    if not engine.config.get("telemetry", "traces"):
        return
    try:
        engine.traces = Traces(engine.config, engine.store, engine.outbox)
    except ImportError as exc:
        from engine.errors import ValidationError

        raise ValidationError(f"[telemetry] traces = true needs the otel extra (pip install 'engine[otel]'): {exc}")
    engine.store.after_commit.append(engine.traces.after_commit)
