"""Shared fixtures: a complete installation in a temporary folder, on SQLite or PostgreSQL.

PostgreSQL tests use the server named by ENGINE_TEST_POSTGRES_URL (CI sets it); each test gets a
database of its own, dropped afterwards. Without the variable those tests are skipped locally.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from engine.app import Engine
from engine.config import load_config
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]
TEST_WORKFLOWS = ROOT / "tests" / "workflows"
POSTGRES_URL = os.environ.get("ENGINE_TEST_POSTGRES_URL", "")


TEST_SETTINGS = {
    "paths": {"workflows": str(TEST_WORKFLOWS)},
    "handlers": {"modules": ["engine.domains", "tests.handlers"]},
    "runner": {"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05, "idle_poll_seconds": 0.02,
               "control_poll_seconds": 0.05, "lease_seconds": 5.0, "heartbeat_seconds": 0.5},
    "inbox": {"poll_seconds": 0.2, "partial_grace_seconds": 0.5},
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table ([owners] alice = {weight = 3})
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def write_config(folder: Path, database_url: str = "", settings: dict | None = None) -> Path:
    """config.toml for a test installation: the test settings, then `settings` on top."""
    merged = {section: dict(values) for section, values in TEST_SETTINGS.items()}
    merged["database"] = {"url": database_url}
    for section, values in (settings or {}).items():
        merged.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text("".join(
        f"[{section}]\n" + "".join(f"{_toml_key(key)} = {_toml_value(value)}\n" for key, value in values.items()) + "\n"
        for section, values in merged.items()))
    return path


class Installation:
    """A config and its engine (store, intake, outbox): what a test needs to drive the engine."""

    def __init__(self, folder: Path, database_url: str = "", settings: dict | None = None):
        self.folder = folder
        self.config_path = write_config(folder, database_url, settings)
        self.config = load_config(self.config_path)
        self.engine = Engine.create(self.config)
        self.store: Store = self.engine.store
        self.intake = self.engine.intake

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SDXL-architecture model built in code, once for the whole run (random weights)."""
    from engine.domains.tinymodels import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("tiny-models") / "tiny"
    build_tiny_sdxl(folder)
    return folder


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    """'' (SQLite) or the URL of a PostgreSQL database of this test's own (dropped afterwards)."""
    if request.param == "sqlite":
        yield ""
        return
    if not POSTGRES_URL:
        pytest.skip("ENGINE_TEST_POSTGRES_URL is not set")
    admin, name, url = _postgres_database()
    try:
        yield url
    finally:
        _drop(admin, name)
