"""How the engine is put together: one owner of a session's end (result.json follows every write
that ends something, whoever made it), one read API whose shapes every door returns, and the
store as the only place that knows its drivers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine import commands
from engine.face import reads
from tests.helpers import engine_process, run_until_idle, submit

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def test_a_session_or_batch_ended_by_a_bare_command_has_its_result_files_when_the_write_returns(backend_install):
    """No door writes result.json: a control straight through engine.commands (as any door makes
    it) finds it written by the store's after-commit hook before the call returns."""
    install = backend_install
    session_id = submit(install, {"workflow": "noop1", "hold": True}).target_id
    batch_id = submit(install, {"kind": "batch", "workflow": "noop1", "hold": True, "items": [{}, {}]}).target_id
    commands.control(install.store, session_id, "cancel")
    commands.control(install.store, batch_id, "cancel")
    result = json.loads((install.config.outbox / session_id / "result.json").read_text())
    assert result["status"] == "cancelled" and result["error"]["code"] == "CANCELLED"
    summary = json.loads((install.config.outbox / "batches" / batch_id / "summary.json").read_text())
    assert summary["status"] == "cancelled" and [i["status"] for i in summary["items"]] == ["cancelled"] * 2
    items = [json.loads(p.read_text()) for p in (install.config.outbox / "batches" / batch_id).glob("item-*/result.json")]
    assert sorted(r["item_index"] for r in items) == [0, 1] and {r["status"] for r in items} == {"cancelled"}


def test_a_result_json_never_appears_before_the_files_it_lists(install):
    """The runner writes result.json after the commit, in the background, once the step's files
    are published: whenever result.json can be read, every artifact it names is there."""
    ids = [submit(install, {"workflow": "files3", "params": {"seed": n}}).target_id for n in range(6)]
    seen, missing, done = {}, [], threading.Event()

    def watch() -> None:
        while not done.is_set() or len(seen) < len(ids):
            for session_id in ids:
                path = install.config.outbox / session_id / "result.json"
                if session_id in seen or not path.exists():
                    continue
                result = json.loads(path.read_text())
                seen[session_id] = result["status"]
                missing.extend(name for name in result["artifacts"] if not (path.parent / name).exists())
            if done.is_set() and len(seen) < len(ids):
                break
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_until_idle(install)
    finally:
        done.set()
        watcher.join()
    assert seen == {session_id: "completed" for session_id in ids} and missing == []


def _stdio(install, *requests: dict) -> dict[str, dict]:
    """The stdio worker's answers to these requests (no runner), by request_id."""
    worker = subprocess.run([sys.executable, "-m", "engine", "worker", "--stdio", "--no-runner"], env=install.env(),
                            cwd=install.folder, input="".join(json.dumps(r) + "\n" for r in requests),
                            capture_output=True, text=True, timeout=120)
    return {a["request_id"]: a for a in map(json.loads, worker.stdout.splitlines())}


def test_every_door_gives_the_same_report_control_answer_and_refusal(install):
    """The CLI, the stdio worker, the HTTP door and the face itself (what the page renders) read
    one session and one batch alike, answer one control alike, and refuse one bad job alike."""
    import httpx

    from tests.served import Served

    session_id = submit(install, {"workflow": "noop1", "job_id": "shape-1"}).target_id
    batch_id = submit(install, {"kind": "batch", "workflow": "noop1", "name": "two", "items": [{}, {}]}).target_id
    held = [submit(install, {"workflow": "noop1", "hold": True}).target_id for _ in range(3)]
    run_until_idle(install)
    face = reads.session(install.engine, session_id)
    face_batch = reads.batch(install.engine, batch_id)
    cli = json.loads(engine_process(install, "session", "shape-1", "--json"))
    cli_batch = json.loads(engine_process(install, "batch", batch_id, "--json"))
    bad = {"workflow": "txt2img", "params": {"steps": "many"}}
    (install.folder / "bad.json").write_text(json.dumps(bad))
    cli_refusal = subprocess.run([sys.executable, "-m", "engine", "submit", "bad.json", "--json"], env=install.env(),
                                 cwd=install.folder, capture_output=True, text=True, timeout=120)
    cli_control = json.loads(engine_process(install, "cancel", held[0], "--json", "--yes"))
    answers = _stdio(install, {"type": "get_session_status", "request_id": "s", "data": {"session_id": session_id}},
                     {"type": "get_batch_status", "request_id": "b", "data": {"batch_id": batch_id}},
                     {"type": "control_session", "request_id": "c", "data": {"session_id": held[1], "action": "cancel"}},
                     {"type": "execute_workflow", "request_id": "x", "data": {"workflow_id": "txt2img",
                                                                            "parameters": bad["params"]}})
    served = Served(install, "--no-runner")
    try:
        http = httpx.get(f"{served.url}/v1/sessions/{session_id}").json()
        http_batch = httpx.get(f"{served.url}/v1/batches/{batch_id}").json()
        http_control = httpx.post(f"{served.url}/v1/sessions/{held[2]}/cancel").json()
        http_refusal = httpx.post(f"{served.url}/v1/jobs", json=bad)
    finally:
        served.stop()
    stdio, stdio_batch = answers["s"]["data"], answers["b"]["data"]
    assert set(face) == set(cli) == set(stdio) == set(http), set(cli) ^ set(http)
    for key in ("session_id", "job_id", "status", "steps", "params", "outbox", "images", "waiting", "error", "domains",
                "actions", "image_details", "links"):
        assert face[key] == cli[key] == stdio[key] == http[key], key
    assert face["status"] == "completed" and face["waiting"] is None and "restart" in face["actions"]
    assert set(face_batch) == set(cli_batch) == set(stdio_batch) == set(http_batch)
    for key in ("items", "name", "actions", "contact_sheet", "links", "status"):
        assert face_batch[key] == cli_batch[key] == stdio_batch[key] == http_batch[key], key
    controls = [cli_control, answers["c"]["data"], http_control]
    assert [set(c) for c in controls] == [{"target_type", "target_id", "action", "events", "effective_at"}] * 3
    assert [(c["target_id"], c["action"], c["events"]) for c in controls] == [
        (held[n], "cancel", ["session.cancelled"]) for n in range(3)]
    refusals = [json.loads(cli_refusal.stdout)[0], answers["x"]["error"], http_refusal.json()]
    assert cli_refusal.returncode == 2 and answers["x"]["success"] is False and http_refusal.status_code == 422
    assert {(r["code"], r["message"]) for r in refusals} == {("VALIDATION_ERROR", refusals[0]["message"])}
    assert "params.steps" in refusals[0]["message"]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_doors_touch_only_the_face_the_root_and_the_errors():
    """Every door (CLI, stdio, HTTP, the page) goes through engine.face for what it writes and
    reads, is hosted by engine.host, and knows the engine's errors; nothing else of the inside."""
    allowed = ("engine.face", "engine.doors", "engine.app", "engine.host", "engine.config", "engine.errors",
               "engine.store.errors")
    reaching = {str(path.relative_to(ENGINE)): sorted(name for name in _imports(path) if name.startswith("engine.")
                                                      and not name.startswith(allowed))
                for path in (ENGINE / "doors").rglob("*.py")}
    assert {path: names for path, names in reaching.items() if names} == {}
    through_the_face = {path.parent.name for path in (ENGINE / "doors").rglob("*.py")
                        if any(name.startswith("engine.face") for name in _imports(path))}
    assert through_the_face == {"doors", "http", "web"}, through_the_face


def test_only_the_store_knows_its_drivers_and_intake_no_domain_internals():
    drivers = ("sqlite3", "psycopg", "sqlalchemy.exc")
    leaking = {str(path.relative_to(ENGINE)): sorted(name for name in _imports(path) if name.startswith(drivers))
               for path in ENGINE.rglob("*.py") if "store" not in path.relative_to(ENGINE).parts}
    assert {path: names for path, names in leaking.items() if names} == {}
    domain_modules = {name for path in (ENGINE / "ingest").glob("*.py") for name in _imports(path)
                      if name.startswith("engine.domains.")}
    assert domain_modules <= {"engine.domains.catalogue", "engine.domains.device"}, domain_modules
