"""Every CLI verb through a real subprocess, exit codes included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, Installation


@pytest.fixture
def cli(tmp_path):
    install = Installation(tmp_path / "engine")

    def call(*args: str, code: int = 0, stdin: str | None = None) -> str:
        result = subprocess.run([sys.executable, "-m", "engine", "--config", str(install.config_path), *args],
                                env=install.env(), capture_output=True, text=True, timeout=120, input=stdin)
        assert result.returncode == code, f"engine {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    call.install = install
    yield call
    install.store.close()


def write_job(folder, name, body) -> str:
    path = folder / name
    path.write_text(json.dumps(body))
    return str(path)


def test_init_submit_run_and_look(cli, tmp_path):
    assert "initialised" in cli("init")
    good = write_job(tmp_path, "a.json", {"workflow": "noop3", "job_id": "cli-a"})
    submitted = json.loads(cli("submit", good, "--json"))
    session_id = submitted[0]["target_id"]
    assert submitted[0]["target_type"] == "session"
    bad = write_job(tmp_path, "b.json", {"workflow": "noop3", "params": {"steps": 0}})
    assert "VALIDATION_ERROR" in cli("submit", bad, code=2)
    assert "3 steps done" in cli("run", "--until-idle", "--quiet")
    sessions = json.loads(cli("sessions", "--json", "--status", "completed"))
    assert [s["session_id"] for s in sessions] == [session_id]
    report = json.loads(cli("session", "cli-a", "--json"))
    assert report["status"] == "completed" and len(report["steps"]) == 3
    assert "completed" in cli("session", session_id, "--follow")
    events = json.loads(cli("events", session_id, "--json"))
    assert events[0]["type"] == "session.created" and events[-1]["type"] == "session.completed"
    assert "0 differences" in cli("rebuild", "--verify")
    assert "rebuilt" in cli("rebuild", "--yes")
    rows = json.loads(cli("sql", "select status, count(*) as n from session_status group by 1", "--json"))
    assert rows == [{"status": "completed", "n": 1}]


def test_exit_codes_of_the_contract(cli, tmp_path):
    assert "NOT_FOUND" in cli("session", "ses-missing", code=3)
    assert "NOT_FOUND" in cli("pause", "ses-missing", code=3)
    job = write_job(tmp_path, "c.json", {"workflow": "noop1", "job_id": "cli-c"})
    cli("submit", job)
    cli("run", "--until-idle", "--quiet")
    assert "INVALID_TRANSITION" in cli("pause", "cli-c", code=4)
    assert "UNKNOWN_WORKFLOW" in cli("workflows", "nope", code=2)
    assert "refused" in cli("sql", "delete from events", code=2)
    assert "refused" in cli("sql", "attach database ':memory:' as x", code=2)
    assert "refused" in cli("sql", "pragma journal_mode = delete", code=2)
    broken = cli.install.folder / "broken.toml"
    broken.write_text("[runner]\nmax_attempts = 'three'\n[nonsense]\n")
    result = subprocess.run([sys.executable, "-m", "engine", "--config", str(broken), "sessions"],
                            env=cli.install.env(), capture_output=True, text=True)
    assert result.returncode == 2 and "unknown section" in result.stderr


def test_controls_and_destructive_verbs_ask_first(cli, tmp_path):
    job = write_job(tmp_path, "d.json", {"workflow": "noop1", "job_id": "cli-d", "hold": True})
    cli("submit", job)
    assert "paused" in json.loads(cli("sessions", "--json"))[0]["status"]
    assert "session.resumed" in cli("resume", "cli-d")
    assert "session.paused" in cli("pause", "cli-d")
    assert "--yes" in cli("cancel", "cli-d", code=2)
    assert "session.cancelled" in cli("cancel", "cli-d", "--yes")
    assert "session.restarted" in cli("restart", "cli-d")
    cli("run", "--until-idle", "--quiet")
    assert "--yes" in cli("delete", "cli-d", code=2)
    assert "session.deleted" in cli("delete", "cli-d", "--yes")
    assert json.loads(cli("sessions", "--json")) == []
    assert "--yes" in cli("rebuild", code=2)


def test_batches_and_batch(cli, tmp_path):
    job = write_job(tmp_path, "e.json", {"kind": "batch", "workflow": "noop1", "job_id": "cli-e",
                                         "items": [{"seed": 1}, {"seed": 2}]})
    batch_id = json.loads(cli("submit", job, "--json"))[0]["target_id"]
    cli("run", "--until-idle", "--quiet")
    assert json.loads(cli("batches", "--json"))[0]["status"] == "completed"
    report = json.loads(cli("batch", "cli-e", "--json"))
    assert report["batch_id"] == batch_id and [i["status"] for i in report["items"]] == ["completed", "completed"]
    summary = json.loads((cli.install.config.outbox / "batches" / batch_id / "summary.json").read_text())
    assert summary["completed_items"] == 2


def test_catalogue_verbs(cli, tmp_path):
    listed = {w["id"] for w in json.loads(cli("workflows", "--json"))}
    assert {"txt2img", "img2img", "inpaint", "controlnet", "upscale", "txt2img-hires", "noop3"} <= listed
    shown = json.loads(cli("workflows", "txt2img-hires", "--json", "--params", '{"width": 512, "height": 512}'))
    assert [s["type"] for s in shown["steps"]][:3] == ["device_discovery", "model_loading", "inference_generation"]
    assert shown["estimate"]["width"] == 512 and shown["estimate"]["seconds"] > 0
    devices = json.loads(cli("devices", "--json"))
    assert devices[-1]["id"] == "cpu" and devices[-1]["total_memory"] > 0
    assert json.loads(cli("models", "--json")) == []
    pickle = tmp_path / "up.pth"
    pickle.write_bytes(b"not really")
    assert "UNSAFE_MODEL_FORMAT" in cli("models", "add", str(pickle), "--id", "up", code=2)
    schema = json.loads(cli("schema"))
    assert schema["title"] == "engine job file"


def test_the_shipped_schema_file_is_not_stale():
    from engine.ingest.jobs import job_schema

    shipped = json.loads((ROOT / "schema" / "job.schema.json").read_text())
    assert shipped == job_schema(), "schema/job.schema.json is stale: engine schema > schema/job.schema.json"


def test_the_shipped_config_documents_every_default():
    from engine.config import DEFAULTS_FILE

    assert (ROOT / "config.toml").read_text() == DEFAULTS_FILE.read_text()


def test_outside_an_installation_commands_say_so_and_create_nothing(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    env = {k: v for k, v in Installation(tmp_path / "other").env().items() if k != "ENGINE_CONFIG"}
    for args in (["sessions"], ["session", "ses-x"], ["run", "--until-idle"], ["sql", "SELECT 1"],
                 ["models", "add", str(empty), "--id", "x"]):
        result = subprocess.run([sys.executable, "-m", "engine", *args], env=env, cwd=empty, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert "no engine installation" in result.stderr and "engine init" in result.stderr
        assert "Traceback" not in result.stderr
    assert list(empty.iterdir()) == [], "nothing was created"


def test_version_status_names_and_model_ids_are_checked(cli, tmp_path):
    from engine import __version__

    assert cli("--version").strip() == f"engine {__version__}"
    refused = cli("sessions", "--status", "bogus", code=2)
    assert "bogus" in refused and "pending, running, paused, completed, failed, cancelled" in refused
    from engine.domains.tinymodels import build_tiny_upscaler

    build_tiny_upscaler(tmp_path / "up.safetensors")
    cli("models", "add", str(tmp_path / "up.safetensors"), "--id", "up")
    again = cli("models", "add", str(tmp_path / "up.safetensors"), "--id", "up", code=2)
    assert "registered already" in again and "--replace" in again
    cli("models", "add", str(tmp_path / "up.safetensors"), "--id", "up", "--replace")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    broken = cli("models", "add", str(tmp_path / "broken.safetensors"), "--id", "broken", code=2)
    assert "VALIDATION_ERROR" in broken and "not a readable .safetensors file" in broken
    assert "Traceback" not in broken and len(broken.strip().splitlines()) <= 3


def test_help_texts_name_config_keys_as_they_are_written():
    from typer.testing import CliRunner

    from engine.doors.cli import app

    shown = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    assert "(else [server] host)" in shown and "(else [server] port, 7860)" in shown
    secret = CliRunner().invoke(app, ["notify", "new-secret", "--help"], terminal_width=200).output
    assert "[notify] secret" in secret
