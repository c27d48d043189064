"""Alembic is the only way the schema changes: upgrades carry existing data along."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, text

from engine.store.migrate import alembic_config
from tests.conftest import Installation
from tests.helpers import query, run_until_idle, status, submit


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


def test_a_database_of_the_first_schema_with_data_upgrades_through_every_migration_intact(tmp_path):
    """Events as the first version wrote them (old job keys, no file identity), their projection rows
    as its reducer made them: after `upgrade head` the log still folds to exactly the live tables, and
    the pending session runs to completion on the upgraded database."""
    from sqlalchemy import inspect

    from engine.store import Event
    from engine.store.projection import MemoryProjection
    from engine.store.reducer import apply

    url = f"sqlite:///{tmp_path / 'engine' / 'engine.db'}"
    (tmp_path / "engine").mkdir()
    config = alembic_config(url)
    command.upgrade(config, "0001")
    steps = [{"type": "noop", "domain": "test", "config": {}}]
    log = [
        Event("session", "ses-done", 1, "session.created", {"session_id": "ses-done", "workflow_id": "noop1",
              "priority": 5, "params": {"prompt": "old"}, "steps": steps}, "2026-01-01 00:00:00.000000", 1),
        Event("job", "file:abc:old.json", 1, "job.received", {"job_key": "file:abc:old.json", "file_name": "old.json",
              "content_hash": "abc", "target_type": "session", "target_id": "ses-done"}, "2026-01-01 00:00:00.000001", 2),
        Event("session", "ses-done", 2, "session.started", {"session_id": "ses-done", "run": 1},
              "2026-01-01 00:00:01.000000", 3),
        Event("session", "ses-done", 3, "step.claimed", {"session_id": "ses-done", "run": 1, "step_index": 0,
              "attempt": 1, "runner_id": "old"}, "2026-01-01 00:00:01.000001", 4),
        Event("session", "ses-done", 4, "step.completed", {"session_id": "ses-done", "run": 1, "step_index": 0,
              "attempt": 1, "duration_s": 0.1, "output": {}}, "2026-01-01 00:00:01.000002", 5),
        Event("session", "ses-done", 5, "session.completed", {"session_id": "ses-done", "run": 1},
              "2026-01-01 00:00:01.000003", 6),
        Event("session", "ses-old", 1, "session.created", {"session_id": "ses-old", "workflow_id": "noop1",
              "priority": 5, "params": {"prompt": "waiting"}, "steps": steps}, "2026-01-01 00:00:02.000000", 7),
        Event("job", "client-7", 1, "job.received", {"job_key": "client-7", "job_id": "client-7", "file_name": "w.json",
              "content_hash": "def", "target_type": "session", "target_id": "ses-old"}, "2026-01-01 00:00:02.000001", 8),
    ]
    folded = MemoryProjection()
    for event in log:
        apply(folded, event)
    engine = create_engine(url)
    with engine.begin() as conn:
        for event in log:
            conn.execute(text("INSERT INTO events VALUES (:id, :st, :sid, :seq, :type, :data, :at)"), {
                "id": event.event_id, "st": event.stream_type, "sid": event.stream_id, "seq": event.seq,
                "type": event.type, "data": event.row()["data"], "at": event.created_at})
        existing = set(inspect(conn).get_table_names())
        first_schema = {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in folded.tables if t in existing}
        for table, rows in folded.tables.items():
            if table not in existing:
                assert not rows, f"the first schema had no {table} table, and the first log no rows for it"
                continue
            for row in rows.values():
                kept = {k: v for k, v in row.items() if k in first_schema[table]}
                conn.execute(text(f"INSERT INTO {table} ({', '.join(kept)}) VALUES ({', '.join(':' + k for k in kept)})"),
                             kept)
    engine.dispose()
    install = Installation(tmp_path / "engine")  # engine init: upgrade head on the existing file
    assert install.store.verify() == []
    assert query(install, "SELECT job_key, file_identity, stored_as, move_error FROM jobs ORDER BY job_key") == [
        ("client-7", None, None, None), ("file:abc:old.json", None, None, None)]
    assert query(install, "SELECT count(*) FROM runner_status") == [(0,)]
    run_until_idle(install)
    assert status(install, "ses-old") == "completed" and status(install, "ses-done") == "completed"
    assert install.store.verify() == []
    # A job_id recorded under the old key still counts: a new file with it is a duplicate.
    from engine.errors import DuplicateJob
    import pytest

    with pytest.raises(DuplicateJob):
        submit(install, {"workflow": "noop1", "job_id": "client-7"})
