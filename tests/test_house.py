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

from engine import commands, queries
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


def test_every_door_reports_a_session_and_a_batch_in_the_same_shape(install):
    session_id = submit(install, {"workflow": "noop1", "job_id": "shape-1"}).target_id
    batch_id = submit(install, {"kind": "batch", "workflow": "noop1", "name": "two", "items": [{}, {}]}).target_id
    run_until_idle(install)
    read = queries.session_report(install.store, install.engine.outbox, session_id)
    cli = json.loads(engine_process(install, "session", "shape-1", "--json"))
    cli_batch = json.loads(engine_process(install, "batch", batch_id, "--json"))
    requests = [{"type": "get_session_status", "request_id": "s", "data": {"session_id": session_id}},
                {"type": "get_batch_status", "request_id": "b", "data": {"batch_id": batch_id}}]
    worker = subprocess.run([sys.executable, "-m", "engine", "worker", "--stdio", "--no-runner"], env=install.env(),
                            cwd=install.folder, input="".join(json.dumps(r) + "\n" for r in requests),
                            capture_output=True, text=True, timeout=120)
    answers = {a["request_id"]: a for a in map(json.loads, worker.stdout.splitlines())}
    stdio, stdio_batch = answers["s"]["data"], answers["b"]["data"]
    assert set(read) == set(cli) == set(stdio), (set(cli) ^ set(stdio))
    for key in ("session_id", "job_id", "status", "steps", "params", "outbox", "images", "waiting", "error", "domains"):
        assert read[key] == cli[key] == stdio[key], key
    assert read["status"] == "completed" and read["waiting"] is None
    batch = queries.batch_report(install.store, batch_id)
    assert set(batch) == set(cli_batch) == set(stdio_batch)
    assert batch["items"] == cli_batch["items"] == stdio_batch["items"] and batch["name"] == "two"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_store_knows_its_drivers_and_intake_no_domain_internals():
    drivers = ("sqlite3", "psycopg", "sqlalchemy.exc")
    leaking = {str(path.relative_to(ENGINE)): sorted(name for name in _imports(path) if name.startswith(drivers))
               for path in ENGINE.rglob("*.py") if "store" not in path.relative_to(ENGINE).parts}
    assert {path: names for path, names in leaking.items() if names} == {}
    domain_modules = {name for path in (ENGINE / "ingest").glob("*.py") for name in _imports(path)
                      if name.startswith("engine.domains.")}
    assert domain_modules <= {"engine.domains.catalogue", "engine.domains.device"}, domain_modules
