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
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from engine.errors import EngineError, ValidationError
from engine.face import reads, writes
from engine.face.follow import Follower
from engine.face.words import ACTIONS, CASES, snake_case, to_case
from engine.host import Host
from engine.store.errors import StoreError

log = logging.getLogger("engine.worker")

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


class StdioWorker:
    """Serves requests from `source` to `sink` until EOF."""

    def __init__(self, engine, case: str = "snake", sink: TextIO = sys.stdout, client_id: str | None = None) -> None:
        """`engine`: the installation (engine.app.Engine) the requests are served from.
        `client_id`: the owner of what this client submits (a request's own "owner" wins)."""
        self.engine = engine
        self.client_id = client_id
        self.config, self.store, self.intake = engine.config, engine.store, engine.intake
        self.case = case
        self.sink = sink
        self.lock = threading.Lock()
        self.subscriptions: set[str] = set()
        self.subscribed_all = False
        self.events = Follower(self.store)
        self.handlers: dict[str, Callable[[dict], Any]] = {
            "get_workflows": self.get_workflows, "get_workflow": self.get_workflow,
            "execute_workflow": self.execute_workflow, "get_session_status": self.get_session_status,
            "control_session": self.control_session, "delete_session": self.delete_session,
            "execute_batch": self.execute_batch, "get_batch_status": self.get_batch_status,
            "control_batch": self.control_batch, "delete_batch": self.delete_batch,
            "get_capabilities": self.get_capabilities,
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
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the worker: the client hears of it, the log has it
            log.exception("request %s failed", request_id)
            return {"success": False, "request_id": request_id,
                    "error": {"code": "INTERNAL_ERROR", "message": f"{type(exc).__name__}: {exc}", "details": []}}

    def write(self, value: dict[str, Any]) -> None:
        with self.lock:
            self.sink.write(json.dumps(value, default=str) + "\n")
            self.sink.flush()

    # commands ------------------------------------------------------------------------------

    def get_workflows(self, data: dict) -> dict:
        return {"workflows": reads.workflows(self.engine)}

    def get_workflow(self, data: dict) -> dict:
        return reads.workflow(self.engine, _required(data, "workflow_id"), data.get("parameters"))

    def execute_workflow(self, data: dict) -> dict:
        params = data.get("parameters")
        if params is None:  # the notes' generate_images sends the params themselves (checked as params)
            params = {k: v for k, v in data.items() if k not in WORKFLOW_FIELDS}
            if data.get("model_id"):
                params["model"] = data["model_id"]
        else:
            _refuse_unknown(data, WORKFLOW_FIELDS)
        job = {"job_id": data.get("job_id") or data.get("session_id"), "workflow": data.get("workflow_id") or "txt2img",
               "params": params, "hold": bool(data.get("hold")), "owner": data.get("owner") or self.client_id}
        if data.get("priority") is not None:
            job["priority"] = data["priority"]
        submitted = self._submit(job)
        report = self._session(submitted.target_id)
        return {"session_id": report["session_id"], "job_id": report["job_id"], "workflow": report["workflow_id"],
                "status": report["status"], "total_steps": report["total_steps"],
                "estimated_time": report["estimated_completion_seconds"], "already_submitted": submitted.already}

    def get_session_status(self, data: dict) -> dict:
        return self._session(_required(data, "session_id"))

    def control_session(self, data: dict) -> dict:
        return self._control_action(_required(data, "session_id"), data)

    def control_batch(self, data: dict) -> dict:
        return self._control_action(data.get("batch_tracking_id") or _required(data, "batch_id"), data)

    def _control_action(self, target: str, data: dict) -> dict:
        """pause, resume, cancel, restart, delete, or priority with "priority": the new value."""
        action = str(_required(data, "action") if "action" in data else data.get("control", "")).lower()
        if action not in ACTIONS:
            raise ValidationError(f"action {action!r}: one of {', '.join(ACTIONS)}", [{"loc": "action"}])
        return self._control(target, action, _required(data, "priority") if action == "priority" else None)

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
               "params": data.get("parameters") or {}, "hold": bool(data.get("hold")),
               "owner": data.get("owner") or self.client_id}
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
        return reads.capabilities(self.engine)

    def get_session_events(self, data: dict) -> dict:
        after = int(data.get("after") or data.get("after_event_id") or 0)
        found = reads.events(self.engine, str(_required(data, "session_id")), after=after)
        found["events"] = [{k: e[k] for k in ("event_id", "type", "data", "created_at")} for e in found["events"]]
        return found

    def subscribe(self, data: dict) -> dict:
        ids = data.get("ids") or data.get("session_ids") or data.get("batch_ids") or data.get("targets") or "all"
        if ids == "all" or ids == ["all"]:
            self.subscribed_all = True
        else:
            for target in ids if isinstance(ids, list) else [ids]:
                self.subscriptions.add(reads.target(self.engine, str(target))[1])
        return {"subscribed": "all" if self.subscribed_all else sorted(self.subscriptions)}

    # events pushed to subscribers ----------------------------------------------------------

    def push_events(self) -> None:
        """Write the events committed since the last look that subscribers asked for."""
        if not (self.subscribed_all or self.subscriptions):
            self.events.skip_to_now()
            return
        for event in self.events.new():
            if self.subscribed_all or event["stream_id"] in self.subscriptions:
                self.write(to_case({"type": "event", "event_id": event["event_id"], "stream_type": event["stream_type"],
                                    "stream_id": event["stream_id"], "event": event["type"], "data": event["data"],
                                    "created_at": event["created_at"]}, self.case))

    def push_until(self, done: threading.Event) -> None:
        """push_events every 0.2 s until `done`; the database's trouble is tried again at the next look."""
        while not done.wait(0.2):
            try:
                self.push_events()
            except StoreError:
                continue
            except BrokenPipeError:  # the client closed our output
                return

    # helpers -------------------------------------------------------------------------------

    def _submit(self, job: dict) -> writes.Submitted:
        # The protocol's client-chosen session_id / batch_id names one session: sent again, it is
        # answered with that session (already_submitted), where a second job file is refused.
        return writes.submit_mapping(self.engine, job, "worker")

    def _control(self, target: str, action: str, priority: int | None = None) -> dict:
        return writes.control(self.engine, str(target), action, priority)

    def _session(self, target: str) -> dict:
        return reads.session(self.engine, str(target))

    def _batch(self, target: str) -> dict:
        return reads.batch(self.engine, str(target))


# What execute_workflow and execute_batch take beside params (the notes' fields and the envelope's).
WORKFLOW_FIELDS = ("action", "session_id", "job_id", "workflow_id", "parameters", "priority", "background", "hold", "step_id",
                   "model_id", "owner")
BATCH_FIELDS = ("action", "batch_id", "job_id", "name", "type", "workflow_id", "items", "generation_params", "parameters",
                "configuration", "batch_config", "priority", "hold", "callback_config", "total_images", "owner")
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
    except (ValueError, RecursionError, AttributeError):  # not JSON, too deep, or not an object
        return None


def run_stdio(config, case: str = "snake", with_runner: bool = True, source=None,
              sink: TextIO = sys.stdout, client_id: str | None = None, runner_id: str | None = None) -> None:
    """Serve stdin until EOF, with a runner in this process unless told not to. At EOF the runner
    stops after its current step's record; anything unfinished is left to the next runner. SIGINT
    and SIGTERM stop it as they stop `engine run` (engine.host)."""
    hosted = Host(config, with_runner=with_runner, with_inbox=False, runner_id=runner_id)
    if not hosted.open():
        return
    worker = StdioWorker(hosted.engine, case, sink, client_id)
    done = threading.Event()
    pusher = threading.Thread(target=worker.push_until, args=(done,), name="engine-events", daemon=True)
    door = threading.Thread(target=worker.serve, args=(source if source is not None else sys.stdin.buffer,),
                            name="engine-stdio", daemon=True)
    hosted.start_background()
    pusher.start()
    door.start()
    try:
        hosted.wait(door)
    finally:
        done.set()
        pusher.join(timeout=5)
        hosted.close()
    if door.is_alive():  # stopped by a signal while the client still holds stdin open: its read never returns
        sink.flush()
        logging.shutdown()
        os._exit(0)
