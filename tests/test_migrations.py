"""Alembic is the only way the schema changes: upgrades carry existing data along."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, text

from engine.store.migrate import alembic_config
from tests.conftest import Installation
from tests.helpers import run_until_idle, status, submit


def test_upgrading_from_the_first_schema_fills_the_claim_queue(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO sessions (session_id, workflow_id, status, run, current_step, total_steps, priority, params, "
            "steps, created_event, created_at, updated_at, last_seq) VALUES "
            "('ses-old', 'noop1', 'pending', 1, 0, 1, 5, '{}', '[]', 1, 'now', 'now', 1), "
            "('ses-done', 'noop1', 'completed', 1, 1, 1, 5, '{}', '[]', 2, 'now', 'now', 5)"))
        conn.execute(text(
            "INSERT INTO steps (session_id, step_index, run, step_type, domain, status, attempts) VALUES "
            "('ses-old', 0, 1, 'noop', 'test', 'pending', 0), ('ses-done', 0, 1, 'noop', 'test', 'completed', 1)"))
    command.upgrade(config, "head")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT session_id, ready, ready_at FROM sessions ORDER BY session_id")).all()
        assert [tuple(r) for r in rows] == [("ses-done", 0, None), ("ses-old", 1, 0.0)]
        assert conn.execute(text("SELECT count(*) FROM session_status")).scalar() == 2
    command.downgrade(config, "0001")
    command.upgrade(config, "head")
    engine.dispose()


def test_init_is_idempotent_and_the_log_rebuilds_after_it(tmp_path):
    install = Installation(tmp_path / "engine")
    session_id = submit(install, {"workflow": "noop3"}).target_id
    Installation(tmp_path / "engine")  # a second init on the same folder
    run_until_idle(install)
    assert status(install, session_id) == "completed"
    assert install.store.verify() == []
