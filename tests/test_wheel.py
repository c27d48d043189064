"""The built wheel is a complete engine: installed without `-e` into a fresh environment, outside
the repository, it creates an installation (its migrations ship inside it) and runs tiny jobs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installed_without_editable_runs_engine_init_and_a_tiny_job(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("engine-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "engine/migrations/env.py" in names and "engine/migrations/script.py.mako" in names
    shipped = {Path(n).name for n in names if n.startswith("engine/migrations/versions/")}
    assert shipped == {p.name for p in (ROOT / "migrations" / "versions").glob("*.py")}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "engine").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= set(names), f"modules missing from the wheel: {sorted(modules - set(names))}"
    web = ROOT / "engine" / "doors" / "web"
    pages = {str(p.relative_to(ROOT)) for folder in ("templates", "static") for p in (web / folder).rglob("*")
             if p.is_file()}
    assert pages and pages <= set(names), f"the web page's files missing from the wheel: {sorted(pages - set(names))}"

    # A fresh environment that sees the heavy dependencies (torch, diffusers) already installed,
    # with the engine itself only from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import engine.store.migrate as m, engine; "
                            "print(engine.__file__); print(m.MIGRATIONS_DIR)"],
                           capture_output=True, text=True, cwd=elsewhere, timeout=120)
    assert where.returncode == 0, where.stderr
    package, migrations = where.stdout.split()
    assert Path(package).is_relative_to(venv) and Path(migrations).is_relative_to(venv), where.stdout

    command = str(venv / "bin" / "engine")
    init = subprocess.run([command, "init"], capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert init.returncode == 0, init.stdout + init.stderr
    assert (elsewhere / "config.toml").is_file() and (elsewhere / "engine.db").is_file()
    tables = subprocess.run([command, "sql", "SELECT count(*) AS n FROM session_status", "--json"],
                            capture_output=True, text=True, cwd=elsewhere, timeout=120)
    assert tables.returncode == 0 and json.loads(tables.stdout) == [{"n": 0}], tables.stdout + tables.stderr

    demo = subprocess.run([command, "demo", "--folder", "demo"], capture_output=True, text=True, cwd=elsewhere,
                          timeout=600)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    ended = subprocess.run([command, "--config", "demo/config.toml", "sql", "--json",
                            "SELECT job_id, status FROM session_status WHERE job_id LIKE 'demo-txt2img%'"],
                           capture_output=True, text=True, cwd=elsewhere, timeout=120)
    rows = json.loads(ended.stdout)
    assert [r["status"] for r in rows] == ["completed"], ended.stdout + ended.stderr
    results = [json.loads(p.read_text()) for p in (elsewhere / "demo" / "outbox").rglob("result.json")]
    done = [r for r in results if r["job_id"] == rows[0]["job_id"]]
    assert done and done[0]["status"] == "completed" and len(done[0]["images"]) == 2

    # The web page, served from the wheel: templates and script come from the installed package.
    from tests.served import free_port

    port = free_port()
    server = subprocess.Popen([command, "--config", "demo/config.toml", "serve", "--no-runner", "--port", str(port)],
                              cwd=elsewhere, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for path in ("/", "/gallery", "/submit", "/runners", "/static/engine.js", "/static/engine.css"):
            answer = httpx.get(f"http://127.0.0.1:{port}{path}")
            assert answer.status_code == 200, (path, answer.text[:300])
        assert "demo-txt2img" in httpx.get(f"http://127.0.0.1:{port}/").text
    finally:
        server.terminate()
        server.wait(timeout=60)
