"""The store translates its drivers' errors into the engine's own (nothing outside `store/` sees a
driver's exception): real SQLite and PostgreSQL errors, read by code, not by message."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import text

from engine.run.failures import classify
from engine.store import StoreBusy, StoreError, StoreUnavailable, UniqueViolation
from engine.store.errors import translate


def _duplicate_insert(store) -> None:
    def insert(tx):
        tx.conn.execute(text("INSERT INTO runners (runner_id, host, pid, started_at, last_heartbeat, expires_at, "
                             "status, devices, version) VALUES ('r', 'h', 1, 0, '', 0, 'running', '[]', '0')"))

    store.write(insert)
    store.write(insert)


def test_a_duplicate_key_is_a_unique_violation_on_either_database(backend_install):
    with pytest.raises(UniqueViolation) as caught:
        _duplicate_insert(backend_install.store)
    assert "the row exists already" in caught.value.message and caught.value.cause is not None
    assert classify(caught.value).retryable and classify(caught.value).code == "STEP_FAILED"


def test_a_wrong_statement_is_a_store_error_and_a_read_translates_too(backend_install):
    with pytest.raises(StoreError) as caught, backend_install.store.read() as conn:
        conn.execute(text("SELECT no_such_column FROM sessions"))
    assert type(caught.value) is StoreError and caught.value.code == "DATABASE_ERROR"


def test_a_database_locked_by_another_program_is_busy_by_its_result_code(tmp_path):
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            other.execute("BEGIN IMMEDIATE")
        assert isinstance(translate(caught.value), StoreBusy)
    finally:
        holder.close()
        other.close()


def test_a_database_that_cannot_be_reached_is_unavailable(tmp_path):
    from engine.store import Store

    store = Store("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(StoreUnavailable), store.read() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        store.close()
