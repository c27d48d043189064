"""OpenTelemetry traces, sent by a real `engine run` over OTLP/HTTP to a real HTTP receiver and
decoded with OpenTelemetry's own protobuf definitions: each ended session is one trace, a span
from its creation to its end with a child span for each attempt of each step; off by default."""

from __future__ import annotations

import subprocess
import sys
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from engine import traces
from tests.conftest import Installation
from tests.helpers import query, submit
from tests.receiver import Receiver


def spans_received(receiver: Receiver) -> list:
    found = []
    for request in receiver.requests:
        assert request["path"] == "/v1/traces"
        assert request["headers"]["content-type"] == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(request["raw"])
        for resource in message.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            for scope in resource.scope_spans:
                found += [(service, span) for span in scope.spans]
    return found


def attributes(span) -> dict:
    return {a.key: (a.value.string_value or a.value.int_value) for a in span.attributes}


def test_each_ended_session_is_a_trace_with_a_span_for_each_step_attempt(tmp_path):
    receiver = Receiver()
    install = Installation(tmp_path / "engine", settings={
        "telemetry": {"traces": True, "endpoint": f"http://127.0.0.1:{receiver.port}/v1/traces", "service_name": "engine-test"},
        "runner": {"max_attempts": 2, "backoff_base_seconds": 0.05}})
    done = submit(install, {"workflow": "noop3", "job_id": "three", "owner": "alice"}).target_id
    failed = submit(install, {"workflow": "broken", "job_id": "doomed"}).target_id
    ran = subprocess.run([sys.executable, "-m", "engine", "run", "--until-idle", "--quiet"], env=install.env(),
                         cwd=install.folder, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    deadline = time.monotonic() + 30
    while len(spans_received(receiver)) < 6 and time.monotonic() < deadline:  # sent at the process's exit
        time.sleep(0.1)
    found = spans_received(receiver)
    assert {service for service, _ in found} == {"engine-test"}
    spans = [span for _, span in found]
    roots = {attributes(s)["engine.session.id"]: s for s in spans if "engine.session.id" in attributes(s)}
    assert set(roots) == {done, failed}

    def children(root) -> list:
        return sorted((s for s in spans if s.parent_span_id == root.span_id), key=lambda s: s.start_time_unix_nano)

    ok = roots[done]
    assert attributes(ok)["engine.job.id"] == "three" and attributes(ok)["engine.owner"] == "alice"
    assert attributes(ok)["engine.status"] == "completed" and ok.status.code != 2  # not ERROR
    steps = children(ok)
    assert [attributes(s)["engine.step.index"] for s in steps] == [0, 1, 2]
    assert all(s.trace_id == ok.trace_id and attributes(s)["engine.step.outcome"] == "completed" for s in steps)
    assert all(ok.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= ok.end_time_unix_nano
               for s in steps)
    assert all(attributes(s)["engine.runner.id"] for s in steps)

    bad = roots[failed]
    assert attributes(bad)["engine.status"] == "failed" and bad.status.code == 2  # ERROR
    tries = children(bad)
    assert [attributes(s)["engine.step.outcome"] for s in tries] == ["retried", "failed"]
    assert [attributes(s)["engine.step.attempt"] for s in tries] == [1, 2]
    assert all(s.status.code == 2 and "planned failure" in s.status.message for s in tries)
    assert query(install, "SELECT count(*) FROM sessions")[0][0] == 2
    install.engine.close()
    receiver.close()


def test_traces_are_off_by_default_and_then_nothing_is_loaded(tmp_path):
    install = Installation(tmp_path / "engine")
    assert install.engine.traces is None
    probe = subprocess.run([sys.executable, "-c", "import sys; from engine.app import Engine; from engine.config "
                            "import load_config; Engine.create(load_config()); "
                            "print(any(m.startswith('opentelemetry') for m in sys.modules))"],
                           env=install.env(), cwd=install.folder, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr
    install.engine.close()


def test_a_session_report_and_its_attempts_become_a_span_and_its_children():
    report = {"session_id": "ses-1", "job_id": "j", "workflow_id": "txt2img", "owner": "bob", "status": "failed",
              "run": 2, "created_at": "2026-12-06 10:00:00.000000", "started_at": "2026-12-06 10:05:00.000000",
              "finished_at": "2026-12-06 10:06:00.500000", "error_code": "STEP_FAILED", "error_message": "boom"}
    timeline = [
        {"run": 1, "step_index": 0, "attempt": 1, "started_at": "2026-12-06 10:00:01", "ended_at": "2026-12-06 10:00:02",
         "outcome": "completed", "step_type": "noop", "domain": "test"},
        {"run": 2, "step_index": 0, "attempt": 1, "started_at": "2026-12-06 10:05:01", "ended_at": "2026-12-06 10:05:03",
         "outcome": "retried", "error_code": "STEP_FAILED", "error_message": "first", "step_type": "noop",
         "domain": "test"},
        {"run": 2, "step_index": 0, "attempt": 2, "started_at": "2026-12-06 10:05:04", "ended_at": None,
         "outcome": None, "step_type": "noop", "domain": "test"},
    ]
    session, steps = traces.session_spans(report, timeline)
    assert session["start"] == traces.nanoseconds("2026-12-06 10:05:00"), "a later run starts at its restart"
    assert session["end"] - session["start"] == 60_500_000_000 and session["error"] == "boom"
    assert len(steps) == 2, "only the attempts of the run that ended"
    assert steps[0]["error"] == "first" and steps[0]["attributes"]["engine.error.code"] == "STEP_FAILED"
    assert steps[1]["end"] == session["end"], "an attempt with no end ends with its session"
