"""`engine worker --stdio` driven as an orchestrator would: a subprocess, JSON lines both ways,
the design notes' request shapes in PascalCase and snake_case, a SIGKILL and a re-attach."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.helpers import query


class Pipe:
    """A worker process and the lines it wrote: responses by request_id, pushed events in order."""

    def __init__(self, install, *options: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "engine", "worker", "--stdio", *options], env=install.env(),
                                        cwd=install.folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.events: list[dict] = []
        self.count = 0

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def ask(self, request: dict | str, request_id: str | None = None) -> dict:
        """Send a request; its response (pushed events on the way are kept)."""
        self.send(request if isinstance(request, str) else json.dumps(request))
        while True:
            line = self.process.stdout.readline()
            assert line, "the worker closed its output"
            answer = json.loads(line)
            if answer.get("type") == "event" or answer.get("Type") == "event":
                self.events.append(answer)
                continue
            found = answer.get("request_id", answer.get("RequestId", answer.get("requestId")))
            if request_id is None or found == request_id:
                return answer

    def call(self, command: str, **data) -> dict:
        self.count += 1
        request_id = f"r{self.count}"
        answer = self.ask({"type": f"processing.{command}", "request_id": request_id, "data": data}, request_id)
        assert answer["success"], answer
        return answer["data"]

    def wait_for(self, session: str, statuses: tuple[str, ...], seconds: float = 60) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = self.call("get_session_status", session_id=session)
            if status["status"] in statuses:
                return status
            time.sleep(0.1)
        raise AssertionError(f"{session} never reached {statuses}: {status}")

    def pushed(self, stream_id: str, seconds: float = 10) -> set[str]:
        """The event types pushed for this stream so far, waiting (while asking cheap questions)
        until its session or batch has ended."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seen = {e["event"] for e in self.events if e["stream_id"] == stream_id}
            if seen & {"session.completed", "session.failed", "session.cancelled", "batch.completed"}:
                return seen
            self.call("get_workflows")
            time.sleep(0.05)
        return {e["event"] for e in self.events if e["stream_id"] == stream_id}

    def close(self) -> int:
        self.process.stdin.close()
        return self.process.wait(timeout=60)


@pytest.fixture
def pipe(install):
    worker = Pipe(install)
    yield worker
    if worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait()


def test_a_workflow_is_executed_followed_and_controlled_through_the_pipe(pipe):
    answer = pipe.ask({"Type": "processing.get_workflows", "RequestId": "w1"}, "w1")
    assert answer["success"] and "tick3" in [w["id"] for w in answer["data"]["workflows"]]
    assert pipe.call("subscribe", ids="all")["subscribed"] == "all"
    shape = {"type": "processing.execute_workflow", "request_id": "x1", "data": {
        "WorkflowId": "tick3", "Parameters": {"NumImages": 1, "CfgScale": 5}, "SessionId": "client-1", "Priority": 5,
        "Background": True}}
    started = pipe.ask(shape, "x1")["data"]
    assert started["job_id"] == "client-1" and started["workflow"] == "tick3" and started["total_steps"] == 3
    again = pipe.ask({**shape, "request_id": "x2"}, "x2")["data"]
    assert again["session_id"] == started["session_id"] and again["already_submitted"], "a client's id is idempotent"
    done = pipe.wait_for("client-1", ("completed",))
    assert done["progress"] == 1.0 and done["domains"] == {"test": "completed"}
    assert {"session.started", "session.completed"} <= pipe.pushed(started["session_id"])
    pascal = pipe.ask({"type": "get_session_status", "request_id": "p1",
                       "data": {"session_id": "client-1", "response_case": "pascal"}}, "p1")
    assert pascal["Success"] and pascal["Data"]["Status"] == "completed" and pascal["Data"]["JobId"] == "client-1"
    events = pipe.call("get_session_events", session_id="client-1", after=0)["events"]
    later = pipe.call("get_session_events", session_id="client-1", after=events[1]["event_id"])["events"]
    assert later == events[2:]

    slow = pipe.call("execute_workflow", workflow_id="sleepy", parameters={"steps": 100})["session_id"]
    pipe.wait_for(slow, ("running",))
    flat = pipe.ask({"action": "control_session", "request_id": "c1", "session_id": slow, "control": "pause"}, "c1")
    assert flat["success"] and flat["data"]["action"] == "pause"
    pipe.wait_for(slow, ("paused",))
    pipe.call("control_session", session_id=slow, action="resume")
    pipe.wait_for(slow, ("running", "pending"))
    pipe.call("control_session", session_id=slow, action="cancel")
    pipe.wait_for(slow, ("cancelled",))
    pipe.call("control_session", session_id=slow, action="restart")
    assert pipe.wait_for(slow, ("pending", "running", "completed"))["status"] in ("pending", "running", "completed")
    deleted = pipe.ask({"type": "processing.delete_session", "request_id": "d1", "data": {"session_id": slow}}, "d1")
    if not deleted["success"]:  # the runner took the restarted session first: a running one is cancelled first
        assert deleted["error"]["code"] == "INVALID_TRANSITION" and deleted["error"]["current_state"] == "running"
        pipe.call("control_session", session_id=slow, action="cancel")
        pipe.wait_for(slow, ("cancelled",))
        deleted = pipe.ask({"type": "processing.delete_session", "request_id": "d2", "data": {"session_id": slow}}, "d2")
    assert deleted["success"] and deleted["data"]["events"]
    gone = pipe.ask({"type": "get_session_status", "request_id": "g1", "data": {"session_id": slow}}, "g1")
    assert (gone["success"] and gone["data"]["status"] == "deleted") or gone["error"]["code"] == "NOT_FOUND"
    assert pipe.close() == 0, "EOF ends the worker cleanly"


def test_a_batch_in_the_notes_inference_shape_with_its_metrics(pipe):
    answer = pipe.ask({"type": "inference.batch_process", "request_id": "b1", "batch_id": "order-7", "action": "x",
                       "data": {"workflow_id": "grouped",
                                "batch_config": {"total_images": 4, "preferred_batch_size": 2, "max_batch_size": 4,
                                                 "enable_dynamic_sizing": False, "memory_threshold": 0.8},
                                "generation_params": [{"item_id": f"i{n}", "prompt": f"p{n}", "steps": 5, "seed": -1}
                                                      for n in range(4)]}}, "b1")
    assert answer["success"], answer
    tracking = answer["data"]["batch_tracking_id"]
    deadline = time.monotonic() + 60
    while True:
        progress = pipe.ask({"type": "inference.get_batch_progress", "request_id": "b2",
                             "data": {"batch_tracking_id": tracking}}, "b2")["data"]
        if progress["status"] == "completed" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert progress["status"] == "completed" and progress["job_id"] == "order-7"
    assert progress["total_batches"] == progress["completed_batches"] == 2 and progress["estimated_time_remaining"] == 0
    assert len(progress["items"]) == 4 and progress["average_batch_time"] > 0
    assert pipe.call("delete_batch", batch_id="order-7")["target_type"] == "batch"


def test_bad_lines_get_error_responses_and_the_next_line_is_served(pipe):
    assert pipe.ask("{not json")["error"]["code"] == "VALIDATION_ERROR"
    assert pipe.ask("[1, 2]")["error"]["code"] == "VALIDATION_ERROR"
    pipe.process.stdin.flush()
    pipe.process.stdin.buffer.write(b'{"type": "get_workflows", "request_id": "\xff"}\n')
    pipe.process.stdin.buffer.flush()
    assert "not UTF-8" in json.loads(pipe.process.stdout.readline())["error"]["message"]
    unknown = pipe.ask({"type": "processing.make_coffee", "request_id": "u1"}, "u1")
    assert unknown["request_id"] == "u1" and "unknown command 'make_coffee'" in unknown["error"]["message"]
    missing = pipe.ask({"type": "processing.get_session_status", "request_id": "m1", "data": {}}, "m1")
    assert missing["error"]["code"] == "VALIDATION_ERROR" and "session_id" in missing["error"]["message"]
    nowhere = pipe.ask({"type": "processing.get_session_status", "request_id": "n1", "data": {"session_id": "x"}}, "n1")
    assert nowhere["error"]["code"] == "NOT_FOUND"
    typo = pipe.ask({"type": "processing.execute_workflow", "request_id": "t1",
                     "data": {"workflow_id": "tick3", "parameters": {"guidence_scale": 2}}}, "t1")
    assert "did you mean 'guidance_scale'" in typo["error"]["message"]
    no_id = pipe.ask({"Type": "processing.get_workflows", "RequestId": 7}, "7")
    assert no_id["success"] and no_id["request_id"] == "7"
    assert pipe.call("get_capabilities")["limits"]["max_priority"] == 100
    single = pipe.ask({"type": "inference.generate_images", "request_id": "g1", "session_id": "step-9",
                       "data": {"workflow_id": "tick3", "prompt": "an owl", "steps": 4, "seed": -1}}, "g1")
    assert single["success"] and single["data"]["job_id"] == "step-9", "the notes' INFERENCE name is an alias"
    assert pipe.close() == 0


def test_a_killed_worker_loses_nothing_and_a_new_one_reattaches(install):
    first = Pipe(install)
    session = first.call("execute_workflow", workflow_id="sleepy", parameters={"steps": 20}, session_id="keep-me")
    first.wait_for("keep-me", ("running",))
    first.process.kill()
    first.process.wait()
    second = Pipe(install)
    try:
        status = second.wait_for("keep-me", ("completed",), seconds=90)
        assert status["session_id"] == session["session_id"]
        assert second.close() == 0
    finally:
        if second.process.poll() is None:
            second.process.kill()


def test_a_batch_name_is_a_label_its_shared_params_apply_and_unknown_keys_are_refused(install):
    pipe = Pipe(install)
    try:
        named = pipe.ask({"Type": "processing.execute_batch", "RequestId": "n1", "Data": {
            "Name": "Spring catalogue, take 2", "WorkflowId": "noop1", "Parameters": {"Steps": 7, "Prompt": "shared"},
            "Items": [{"ItemId": "a", "Parameters": {"Seed": 1}}, {"ItemId": "b", "Parameters": {"Seed": 2}}]}}, "n1")
        assert named["success"], named
        batch_id = named["data"]["batch_id"]
        assert named["data"]["name"] == "Spring catalogue, take 2" and named["data"]["job_id"] is None
        status = pipe.call("get_batch_status", batch_id=batch_id)
        assert status["name"] == "Spring catalogue, take 2"
        params = [json.loads(r[0]) for r in query(install, "SELECT params FROM sessions ORDER BY item_index")]
        assert [(p["steps"], p["prompt"], p["seed"]) for p in params] == [(7, "shared", 1), (7, "shared", 2)]
        typo = pipe.ask({"type": "processing.execute_batch", "request_id": "t1", "data": {
            "workflow_id": "noop1", "itmes": [{}], "items": [{}]}}, "t1")
        assert typo["error"]["code"] == "VALIDATION_ERROR" and "did you mean 'items'" in typo["error"]["message"]
        beside = pipe.ask({"type": "processing.execute_workflow", "request_id": "t2", "data": {
            "workflow_id": "noop1", "parameters": {}, "priorty": 9}}, "t2")
        assert "did you mean 'priority'" in beside["error"]["message"]
        not_object = pipe.ask({"type": "processing.execute_workflow", "request_id": "t3", "data": "txt2img"}, "t3")
        assert not not_object["success"] and "data: a JSON object" in not_object["error"]["message"]
        assert query(install, "SELECT count(*) FROM sessions")[0][0] == 2, "nothing else was created"
    finally:
        pipe.close()


def test_a_line_over_the_limit_is_answered_with_an_error_and_the_next_is_served(tmp_path):
    from tests.conftest import Installation

    install = Installation(tmp_path / "engine", settings={"worker": {"max_line_bytes": 4096}})
    pipe = Pipe(install, "--no-runner")
    try:
        pipe.send(json.dumps({"type": "get_workflows", "request_id": "big", "pad": "x" * 200_000}))
        answer = json.loads(pipe.process.stdout.readline())
        assert not answer["success"] and "max_line_bytes" in answer["error"]["message"]
        assert pipe.call("get_workflows")["workflows"]
    finally:
        assert pipe.close() == 0
        install.store.close()
