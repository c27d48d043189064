"""Shared fixtures: a complete installation in a temporary folder, on SQLite or PostgreSQL.

PostgreSQL tests use the server named by ENGINE_TEST_POSTGRES_URL (CI sets it); each test gets a
database of its own, dropped afterwards. Without the variable those tests are skipped locally.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from engine import app
from engine.config import load_config
from engine.intake import Intake
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]
TEST_WORKFLOWS = ROOT / "tests" / "workflows"
POSTGRES_URL = os.environ.get("ENGINE_TEST_POSTGRES_URL", "")


def write_config(folder: Path, database_url: str = "", modules: str = '["tests.handlers"]', extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(
        f'[database]\nurl = "{database_url}"\n\n'
        f'[paths]\nworkflows = "{TEST_WORKFLOWS}"\n\n'
        f"[handlers]\nmodules = {modules}\n\n"
        "[runner]\nbackoff_base_seconds = 0.01\nbackoff_max_seconds = 0.05\nidle_poll_seconds = 0.02\n"
        "control_poll_seconds = 0.05\nlease_seconds = 5.0\nheartbeat_seconds = 0.5\n\n"
        "[inbox]\npoll_seconds = 0.2\npartial_grace_seconds = 0.5\n\n" + extra
    )
    return path


class Installation:
    """A config, its store and intake: what a test needs to drive the engine."""

    def __init__(self, folder: Path, database_url: str = "", extra: str = "", modules: str = '["tests.handlers"]'):
        self.folder = folder
        self.config_path = write_config(folder, database_url, modules, extra)
        self.config = load_config(self.config_path)
        self.store: Store = app.init(self.config)
        self.intake = Intake(self.config)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["ENGINE_CONFIG"] = str(self.config_path)
        return env


@pytest.fixture
def install(tmp_path) -> Installation:
    installation = Installation(tmp_path / "engine")
    yield installation
    installation.store.close()


def _postgres_database():
    from sqlalchemy import create_engine, text

    name = f"engine_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_URL.rsplit("/", 1)[0]
    return admin, name, f"{base}/{name}"


def _drop(admin, name):
    from sqlalchemy import text

    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_install(request, tmp_path) -> Installation:
    """The same test against SQLite and PostgreSQL (the store's shared test cases)."""
    if request.param == "sqlite":
        installation = Installation(tmp_path / "engine")
        yield installation
        installation.store.close()
        return
    if not POSTGRES_URL:
        pytest.skip("ENGINE_TEST_POSTGRES_URL is not set")
    admin, name, url = _postgres_database()
    installation = Installation(tmp_path / "engine", database_url=url)
    try:
        yield installation
    finally:
        installation.store.close()
        _drop(admin, name)
