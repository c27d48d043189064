"""`engine worker --stdio`: the design notes' PROCESSING worker. One JSON request a line on stdin,
one JSON response a line on stdout (logs on stderr), so an orchestrator in any language drives
the engine through a pipe.

Requests come in three shapes: `{"type": "processing.<command>", "request_id", "data": {...}}`, a
bare `<command>` in `type`, or the notes' flat object whose `action` names the command beside its
fields. Keys may be in any case (the contract's aliases apply to generation params). Responses are
`{"success": true, "request_id", "data"}` or `{"success": false, "request_id", "error": {"code",
"message", "details"}}`, snake_case unless the request's `response_case` (or `--case`) asks for
camel or pascal. A response never waits for generation: a runner runs in this process (unless
`--no-runner`), and `subscribe` pushes `{"type": "event", ...}` lines as events commit.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from sqlalchemy import select, text

from engine import commands
from engine.errors import EngineError, NotFound, ValidationError
from engine.ingest.jobs import ACTIONS, CASES, SCHEDULERS, normalise_keys, parse_job, snake_case, to_case
from engine.run.claims import waited_ms
from engine.run.fleet import why_waiting
from engine.store.tables import sessions

# The notes' INFERENCE names for what PROCESSING does here.
COMMAND_ALIASES = {"batch_process": "execute_batch", "get_batch_progress": "get_batch_status",
                   "generate_images": "execute_workflow"}


@dataclass
class Request:
    command: str
    request_id: str | None
    data: dict[str, Any]
    case: str | None


def parse_request(line: str) -> Request:
    """A request line in any of the three shapes; ValidationError says what is wrong."""
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ValidationError(f"not a JSON object: {exc}") from None
    if not isinstance(raw, dict):
        raise ValidationError(f"a request is one JSON object, not {type(raw).__name__}")
    envelope = {snake_case(str(k)): v for k, v in raw.items()}
    request_id = envelope.get("request_id")
    request_id = None if request_id is None else str(request_id)
    if "data" in envelope and envelope["data"] is not None and not isinstance(envelope["data"], dict):
        raise ValidationError(f"data: a JSON object of the command's fields, not {type(envelope['data']).__name__}",
                              [{"loc": "data"}])
    kind = envelope.get("type")
    if isinstance(kind, str) and kind:
        command = kind.rsplit(".", 1)[-1]
        beside = {k: v for k, v in envelope.items() if k not in ("type", "request_id", "data")}
        data = {**beside, **envelope["data"]} if isinstance(envelope.get("data"), dict) else beside
    elif isinstance(envelope.get("action"), str):
        command = envelope["action"]
        data = {k: v for k, v in envelope.items() if k not in ("action", "request_id", "type")}
        if isinstance(envelope.get("data"), dict):  # the notes' batch_process keeps its fields under data
            data = {**{k: v for k, v in data.items() if k != "data"}, **envelope["data"]}
    else:
        raise ValidationError("no command: give type (\"processing.<command>\") or action", [{"loc": "type"}])
    data = {snake_case(str(k)): v for k, v in data.items()}
    case = data.pop("response_case", None)
    command = snake_case(command)
    return Request(COMMAND_ALIASES.get(command, command), request_id, data, case)


class Worker:
    """Serves requests from `source` to `sink` until EOF."""

    def __init__(self, config, store, intake, case: str = "snake", sink: TextIO = sys.stdout) -> None:
        self.config, self.store, self.intake = config, store, intake
        self.case = case
        self.sink = sink
        self.lock = threading.Lock()
        self.subscriptions: set[str] = set()
        self.subscribed_all = False
        self.last_event = self._newest_event()
        self.handlers: dict[str, Callable[[dict], Any]] = {
            "get_workflows": self.get_workflows, "get_workflow": self.get_workflow,
            "execute_workflow": self.execute_workflow, "get_session_status": self.get_session_status,
            "control_session": self.control_session, "delete_session": self.delete_session,
            "execute_batch": self.execute_batch, "get_batch_status": self.get_batch_status,
            "delete_batch": self.delete_batch, "get_capabilities": self.get_capabilities,
            "get_session_events": self.get_session_events, "subscribe": self.subscribe,
        }

    # the loop ------------------------------------------------------------------------------

    def serve(self, source) -> None:
        """Answer each line of `source` (bytes or text) until EOF, or until the client stops reading.
        A line longer than [worker] max_line_bytes is answered with an error, never held whole."""
        limit = self.config.get("worker", "max_line_bytes")
        try:
            for raw in bounded_lines(source, limit):
                if raw is None:
                    self.write({"success": False, "request_id": None, "error": {
                        "code": "VALIDATION_ERROR", "message": f"the line is longer than [worker] max_line_bytes "
                        f"({limit} bytes); it was read to its end and dropped", "details": []}})
                    continue
                if isinstance(raw, bytes):
                    try:
                        raw = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        self.write({"success": False, "request_id": None, "error": {
                            "code": "VALIDATION_ERROR", "message": f"the line is not UTF-8: {exc.reason} at byte "
                            f"{exc.start}", "details": []}})
                        continue
                if raw.strip():
                    self.write(self.answer(raw))
        except BrokenPipeError:  # the client closed our output: nothing more can be said
            return

    def answer(self, line: str) -> dict[str, Any]:
        request_id, case = _request_id_of(line), self.case
        try:
            request = parse_request(line)
            request_id, case = request.request_id, request.case or self.case
            if case not in CASES:
                raise ValidationError(f"response_case {case!r}: one of {', '.join(CASES)}")
            handler = self.handlers.get(request.command)
            if handler is None:
                raise ValidationError(f"unknown command {request.command!r}; known: {', '.join(sorted(self.handlers))}",
                                      [{"loc": "type"}])
            return to_case({"success": True, "request_id": request_id, "data": handler(request.data)}, case)
        except EngineError as exc:
            return to_case({"success": False, "request_id": request_id, "error": exc.to_dict()},
                           case if case in CASES else "snake")
        except Exception as exc:  # a bug must not stop the worker: the client hears of it
            return {"success": False, "request_id": request_id,
                    "error": {"code": "INTERNAL_ERROR", "message": f"{type(exc).__name__}: {exc}", "details": []}}

    def write(self, value: dict[str, Any]) -> None:
        with self.lock:
            self.sink.write(json.dumps(value, default=str) + "\n")
            self.sink.flush()

    # commands ------------------------------------------------------------------------------

    def get_workflows(self, data: dict) -> dict:
        return {"workflows": [{"id": w.id, "description": w.description, "steps": len(w.steps)}
                              for w in self.intake.workflows.values()]}

    def get_workflow(self, data: dict) -> dict:
        from engine.domains.estimate import estimate
        from engine.ingest.jobs import validate_params

        workflow = self.intake.workflow(_required(data, "workflow_id"))
        params = validate_params(data.get("parameters") or {}, "parameters")
        return {"id": workflow.id, "description": workflow.description, "steps": workflow.resolve(params.model_dump()),
                "estimate": estimate(self.config, workflow, params)}

    def execute_workflow(self, data: dict) -> dict:
        params = data.get("parameters")
        if params is None:  # the notes' generate_images sends the params themselves (checked as params)
            params = {k: v for k, v in data.items() if k not in WORKFLOW_FIELDS}
            if data.get("model_id"):
                params["model"] = data["model_id"]
        else:
            _refuse_unknown(data, WORKFLOW_FIELDS)
        job = {"job_id": data.get("job_id") or data.get("session_id"), "workflow": data.get("workflow_id") or "txt2img",
               "params": params, "hold": bool(data.get("hold"))}
        if data.get("priority") is not None:
            job["priority"] = data["priority"]
        submitted = self._submit(job)
        report = self._session(submitted.target_id)
        return {"session_id": report["session_id"], "job_id": report["job_id"], "workflow": report["workflow_id"],
                "status": report["status"], "total_steps": report["total_steps"],
                "estimated_time": self._estimate(report), "already_submitted": submitted.already}

    def get_session_status(self, data: dict) -> dict:
        return self._session(_required(data, "session_id"))

    def control_session(self, data: dict) -> dict:
        action = str(_required(data, "action") if "action" in data else data.get("control", "")).lower()
        if action not in ACTIONS:
            raise ValidationError(f"action {action!r}: one of {', '.join(ACTIONS)}", [{"loc": "action"}])
        return self._control(_required(data, "session_id"), action)

    def delete_session(self, data: dict) -> dict:
        return self._control(_required(data, "session_id"), "delete")

    def execute_batch(self, data: dict) -> dict:
        _refuse_unknown(data, BATCH_FIELDS)
        config = data.get("configuration") or data.get("batch_config") or {}
        if not isinstance(config, dict):
            raise ValidationError("configuration: a JSON object", [{"loc": "configuration"}])
        config = {snake_case(k): v for k, v in config.items()}
        _refuse_unknown(config, CONFIG_FIELDS, "configuration.")
        items = data.get("items") or data.get("generation_params") or []
        if not isinstance(items, list) or not items:
            raise ValidationError("items: a batch needs a list of items", [{"loc": "items"}])
        overrides = []
        for index, item in enumerate(items):
            item = {snake_case(k): v for k, v in item.items()} if isinstance(item, dict) else item
            if isinstance(item, dict) and "parameters" in item:
                _refuse_unknown(item, ("item_id", "parameters"), f"items[{index}].")
                item = item["parameters"]
            elif isinstance(item, dict):
                item = {k: v for k, v in item.items() if k != "item_id"}
            overrides.append(item)
        batch = {"preferred_batch_size": config.get("preferred_batch_size", 1),
                 "max_batch_size": config.get("max_batch_size", 8),
                 "dynamic_sizing": config.get("enable_dynamic_sizing", config.get("dynamic_sizing", True)),
                 "memory_threshold": config.get("memory_threshold", 0.8)}
        for name in ("parallel_processing", "max_parallel_batches"):
            if name in config:
                batch[name.replace("_processing", "")] = config[name]
        job = {"kind": "batch", "job_id": data.get("batch_id") or data.get("job_id"), "name": data.get("name"),
               "workflow": data.get("workflow_id") or "txt2img", "items": overrides, "batch": batch,
               "params": data.get("parameters") or {}, "hold": bool(data.get("hold"))}
        if data.get("priority") is not None:
            job["priority"] = data["priority"]
        submitted = self._submit(job)
        status = self._batch(submitted.target_id)
        return {"batch_id": submitted.target_id, "batch_tracking_id": submitted.target_id, "job_id": status["job_id"],
                "name": status["name"], "status": status["status"], "total_items": status["total_items"],
                "memory_optimization": batch["dynamic_sizing"], "parallel_processing": False,
                "already_submitted": submitted.already}

    def get_batch_status(self, data: dict) -> dict:
        return self._batch(data.get("batch_tracking_id") or _required(data, "batch_id"))

    def delete_batch(self, data: dict) -> dict:
        return self._control(data.get("batch_tracking_id") or _required(data, "batch_id"), "delete")

    def get_capabilities(self, data: dict) -> dict:
        from engine.domains.device import discover

        entries = self.intake.models.entries().values()
        return {"workflows": sorted(self.intake.workflows), "schedulers": list(SCHEDULERS),
                "models": [{"id": e.id, "kind": e.kind, "family": e.family} for e in entries],
                "devices": [{"id": d.id, "kind": d.kind, "name": d.name, "total_memory": d.total_memory}
                            for d in discover()],
                "limits": dict(self.config.values["limits"]), "actions": list(ACTIONS)}

    def get_session_events(self, data: dict) -> dict:
        target = _required(data, "session_id")
        target_type, target_id = commands.find_target(self.store, str(target))
        after = int(data.get("after") or data.get("after_event_id") or 0)
        rows = self._query("SELECT event_id, type, data, created_at FROM event_log WHERE stream_id = :id "
                           "AND event_id > :after ORDER BY event_id", id=target_id, after=after)
        return {"target_type": target_type, "target_id": target_id,
                "events": [{"event_id": r[0], "type": r[1], "data": json.loads(r[2]), "created_at": r[3]} for r in rows]}

    def subscribe(self, data: dict) -> dict:
        ids = data.get("ids") or data.get("session_ids") or data.get("batch_ids") or data.get("targets") or "all"
        if ids == "all" or ids == ["all"]:
            self.subscribed_all = True
        else:
            for target in ids if isinstance(ids, list) else [ids]:
                self.subscriptions.add(commands.find_target(self.store, str(target))[1])
        return {"subscribed": "all" if self.subscribed_all else sorted(self.subscriptions)}

    # events pushed to subscribers ----------------------------------------------------------

    def push_events(self) -> None:
        """Write the events committed since the last look that subscribers asked for."""
        if not (self.subscribed_all or self.subscriptions):
            self.last_event = self._newest_event()
            return
        rows = self._query("SELECT event_id, stream_type, stream_id, type, data, created_at FROM event_log "
                           "WHERE event_id > :after ORDER BY event_id LIMIT 1000", after=self.last_event)
        for event_id, stream_type, stream_id, kind, payload, created_at in rows:
            self.last_event = event_id
            if self.subscribed_all or stream_id in self.subscriptions:
                self.write(to_case({"type": "event", "event_id": event_id, "stream_type": stream_type,
                                    "stream_id": stream_id, "event": kind, "data": json.loads(payload),
                                    "created_at": created_at}, self.case))

    # helpers -------------------------------------------------------------------------------

    def _submit(self, job: dict) -> commands.Submitted:
        from engine.errors import DuplicateJob

        parsed = parse_job(normalise_keys({k: v for k, v in job.items() if v is not None}), self.intake.limits)
        try:
            return commands.submit(self.store, self.intake, parsed,
                                   commands.Source("worker", uuid.uuid4().hex, f"worker:{uuid.uuid4().hex}"))
        except DuplicateJob as exc:  # a client-chosen id sent again: the same session, as with job_id
            return commands.Submitted(exc.extra["existing_type"], exc.extra["existing_id"], already=True)

    def _control(self, target: str, action: str) -> dict:
        from engine.outbox.folders import Outbox

        target_type, target_id, appended = commands.control(self.store, str(target), action)
        Outbox(self.config.outbox).finish(self.store, appended)
        return {"target_type": target_type, "target_id": target_id, "action": action,
                "events": [e.type for e in appended], "effective_at": appended[-1].created_at if appended else None}

    def _session(self, target: str) -> dict:
        rows = self._query("SELECT s.*, l.message AS activity FROM session_status s LEFT JOIN leases l "
                           "ON l.session_id = s.session_id AND l.step_index = s.current_step "
                           "WHERE s.session_id = :id OR s.job_id = :id", id=str(target), mapped=True)
        if not rows:
            raise NotFound(f"no session {target!r}")
        report = dict(rows[0])
        report["steps"] = [dict(r) for r in self._query(
            "SELECT step_index, step_type, domain, status, attempts, started_at, finished_at, error_code "
            "FROM step_status WHERE session_id = :id ORDER BY step_index", id=report["session_id"], mapped=True)]
        report["domains"] = {s["domain"]: s["status"] for s in report["steps"]}
        report["error"] = ({"code": report["error_code"], "message": report["error_message"]}
                           if report.get("error_code") else None)
        report["estimated_completion_seconds"] = self._estimate(report)
        with self.store.read() as conn:
            params = json.loads(conn.execute(select(sessions.c.params).where(
                sessions.c.session_id == report["session_id"])).scalar_one())
            report["waiting"] = why_waiting(conn, report["session_id"], report["status"], report["current_step"], params)
        return report

    def _batch(self, target: str) -> dict:
        rows = self._query("SELECT s.*, b.name FROM batch_status s JOIN batches b ON b.batch_id = s.batch_id "
                           "WHERE s.batch_id = :id OR s.job_id = :id", id=str(target), mapped=True)
        if not rows:
            raise NotFound(f"no batch {target!r}")
        report = dict(rows[0])
        report["items"] = [dict(r) for r in self._query(
            "SELECT item_index, session_id, status FROM items WHERE batch_id = :id ORDER BY item_index",
            id=report["batch_id"], mapped=True)]
        return report

    @staticmethod
    def _estimate(report: dict) -> float | None:
        """Seconds left at the rate so far (None before there is a rate to go by)."""
        if report.get("status") in ("completed", "failed", "cancelled"):
            return 0.0
        progress, started = report.get("progress") or 0.0, report.get("started_at")
        if progress <= 0 or not started:
            return None
        elapsed = waited_ms(started, time.time()) / 1000.0
        return round(elapsed * (1 - progress) / progress, 1)

    def _newest_event(self) -> int:
        rows = self._query("SELECT max(event_id) FROM event_log")
        return int(rows[0][0] or 0)

    def _query(self, sql: str, mapped: bool = False, **params) -> list:
        with self.store.read() as conn:
            result = conn.execute(text(sql), params)
            return list(result.mappings()) if mapped else [tuple(r) for r in result]


# What execute_workflow and execute_batch take beside params (the notes' fields and the envelope's).
WORKFLOW_FIELDS = ("action", "session_id", "job_id", "workflow_id", "parameters", "priority", "background", "hold", "step_id",
                   "model_id")
BATCH_FIELDS = ("action", "batch_id", "job_id", "name", "type", "workflow_id", "items", "generation_params", "parameters",
                "configuration", "batch_config", "priority", "hold", "callback_config", "total_images")
CONFIG_FIELDS = ("total_images", "preferred_batch_size", "max_batch_size", "enable_dynamic_sizing", "dynamic_sizing",
                 "memory_threshold", "parallel_processing", "max_parallel_batches")


def _refuse_unknown(data: dict, known, where: str = "") -> None:
    """An unknown key is refused as in job files, with the nearest known one."""
    import difflib

    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
            raise ValidationError(f"{where}{key}: unknown key{hint}", [{"loc": f"{where}{key}"}])


def bounded_lines(source, limit: int):
    """The lines of `source`, each at most `limit` bytes; None in place of a longer one, whose rest
    is read in pieces of at most `limit` and dropped (memory stays bounded whatever is sent)."""
    if not hasattr(source, "readline"):  # a list of lines, in tests
        for line in source:
            yield None if len(line) > limit else line
        return
    while True:
        line = source.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n" if isinstance(line, bytes) else "\n") and len(line) == limit + 1:
            yield line
            continue
        while line and not line.endswith(b"\n" if isinstance(line, bytes) else "\n"):
            line = source.readline(limit + 1)
        yield None


def _required(data: dict, key: str) -> Any:
    if data.get(key) in (None, ""):
        raise ValidationError(f"{key}: required", [{"loc": key}])
    return data[key]


def _request_id_of(line: str) -> str | None:
    """The request_id of a line that may not parse as a request, when it can be read."""
    try:
        raw = json.loads(line)
        found = next((v for k, v in raw.items() if snake_case(str(k)) == "request_id"), None)
        return None if found is None else str(found)
    except Exception:
        return None


def run_stdio(config, case: str = "snake", with_runner: bool = True, source=None,
              sink: TextIO = sys.stdout) -> None:
    """Serve stdin until EOF, with a runner in this process unless told not to. At EOF the runner
    stops after its current step's record; anything unfinished is left to the next runner."""
    from engine.app import init, registry_for, require_installation
    from engine.ingest.intake import Intake
    from engine.run.runner import Runner

    require_installation(config)
    store = init(config)
    worker = Worker(config, store, Intake(config, store), case, sink)
    done = threading.Event()
    threads = []
    runner = Runner(config, store, registry_for(config)) if with_runner else None
    if runner is not None:
        threads.append(threading.Thread(target=runner.run, name="engine-runner", daemon=True))

    def pushing() -> None:
        while not done.wait(0.2):
            try:
                worker.push_events()
            except Exception:  # the database hiccuped: the next look catches up
                continue

    threads.append(threading.Thread(target=pushing, name="engine-events", daemon=True))
    for thread in threads:
        thread.start()
    try:
        worker.serve(source if source is not None else sys.stdin.buffer)
    finally:
        done.set()
        if runner is not None:
            runner.stop()
        for thread in threads:
            thread.join(timeout=30)
        if runner is not None:
            runner.close()
        store.close()
