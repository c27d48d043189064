"""`engine sql` is read-only by construction on both stores: one statement, parsed by the
database, a read-only transaction, a time limit, no function that reaches outside; on PostgreSQL
a superuser is refused and a role that can only read does the reading."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL, Installation, _drop, _postgres_database
from tests.helpers import query, submit


def sql(install, statement: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "sql", statement], env={**install.env(), **(env or {})},
                          capture_output=True, text=True, timeout=120, cwd=install.folder)


def event_count(install) -> int:
    return query(install, "SELECT count(*) FROM events")[0][0]


def test_engine_sql_on_sqlite_runs_one_reading_statement_within_a_time_limit(install):
    submit(install, {"workflow": "noop1", "job_id": "kept"})
    before = event_count(install)
    refused = {
        "SELECT 1; DELETE FROM events": "exactly one statement",
        "DELETE FROM events WHERE event_id = 1": "read-only",
        "ATTACH DATABASE 'x.db' AS x": "read-only",
        "PRAGMA journal_mode = DELETE": "read-only",
        "SELECT fts3_tokenizer('simple')": "read-only",  # it returns a pointer into the process
    }
    for statement, said in refused.items():
        done = sql(install, statement)
        assert done.returncode == 2, (statement, done.stdout, done.stderr)
        assert said in done.stderr and "Traceback" not in done.stderr, (statement, done.stderr)
    runaway = sql(install, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                  {"ENGINE_DATABASE_SQL_TIMEOUT_SECONDS": "1"})
    assert runaway.returncode == 1 and "TIMEOUT" in runaway.stderr and "sql_timeout_seconds" in runaway.stderr
    huge = sql(install, "SELECT length(zeroblob(4000000000))")
    assert huge.returncode == 2 and "too big" in huge.stderr
    assert "kept" in sql(install, "SELECT job_id FROM session_status").stdout
    assert event_count(install) == before


def test_an_installation_whose_path_holds_hash_and_question_marks_keeps_its_database_there(tmp_path):
    folder = tmp_path / "studio #1?draft"
    install = Installation(folder)
    try:
        assert (folder / "engine.db").is_file() and not (tmp_path / "studio ").exists()
        submit(install, {"workflow": "noop1", "job_id": "in-the-odd-folder"})
        listed = sql(install, "SELECT job_id FROM session_status")
        assert listed.returncode == 0 and "in-the-odd-folder" in listed.stdout, listed.stderr
        fresh = tmp_path / "fresh #2?"
        fresh.mkdir()
        env = {k: v for k, v in install.env().items() if k != "ENGINE_CONFIG"}
        subprocess.run([sys.executable, "-m", "engine", "init"], env=env, cwd=fresh, check=True, capture_output=True)
        assert (fresh / "engine.db").is_file() and (fresh / "config.toml").is_file()
    finally:
        install.store.close()


@pytest.mark.postgres
def test_engine_sql_on_postgres_refuses_a_superuser_and_reads_through_a_role_that_can_only_read(tmp_path):
    if not POSTGRES_URL:
        pytest.skip("ENGINE_TEST_POSTGRES_URL is not set")
    admin, name, url = _postgres_database()
    install = Installation(tmp_path / "engine", database_url=url)
    role = f"reader_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "pwned"
    try:
        submit(install, {"workflow": "noop1", "job_id": "kept"})
        before = event_count(install)
        as_superuser = sql(install, "COMMIT; DELETE FROM events WHERE event_id = 1")
        assert as_superuser.returncode == 2 and "superuser" in as_superuser.stderr and "engine sql-role" in as_superuser.stderr
        made = subprocess.run([sys.executable, "-m", "engine", "sql-role", role], env=install.env(), capture_output=True,
                              text=True, timeout=120, cwd=install.folder)
        assert made.returncode == 0, made.stderr
        reader = {"ENGINE_DATABASE_READONLY_URL": made.stdout.strip(), "ENGINE_DATABASE_SQL_TIMEOUT_SECONDS": "1"}
        assert role in reader["ENGINE_DATABASE_READONLY_URL"]
        for statement in ("COMMIT; DELETE FROM events WHERE event_id = 1", "DELETE FROM events WHERE event_id = 1",
                          "COMMIT; CREATE TABLE x (a int)", f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
                          "SELECT pg_read_file('/etc/hostname')", "WITH d AS (DELETE FROM events RETURNING 1) SELECT 1",
                          "SELECT set_config('transaction_read_only', 'off', false)"):
            done = sql(install, statement, reader)
            assert done.returncode == 2, (statement, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr
        slow = sql(install, "SELECT pg_sleep(30)", reader)
        assert slow.returncode == 1 and "TIMEOUT" in slow.stderr
        # The inbox's and submit's turns: the key of a job_id, held by a reader while it sleeps.
        import hashlib

        key = int.from_bytes(hashlib.sha256(b"job_id:victim").digest()[:8], "big", signed=True)
        for statement in (f"SELECT pg_advisory_xact_lock({key}), pg_sleep(25)",
                          f"SELECT pg_try_advisory_lock({key})", "SELECT pg_advisory_lock_shared(1, 2)",
                          "SELECT session_id, pg_sleep(25) FROM sessions FOR UPDATE"):
            started = time.monotonic()
            held = sql(install, statement, reader)
            assert held.returncode == 2 and time.monotonic() - started < 15, (statement, held.stderr)
            assert ("permission denied" in held.stderr or "read-only" in held.stderr) and "Traceback" not in held.stderr
        started = time.monotonic()
        submit(install, {"workflow": "noop1", "job_id": "victim"})
        assert time.monotonic() - started < 5
        before = event_count(install)  # the victim's submit, and nothing the reader did
        # A role made before (PUBLIC could take the locks then) is refused, saying how to mend it.
        from sqlalchemy import create_engine, text

        grant = create_engine(url, isolation_level="AUTOCOMMIT")
        with grant.connect() as conn:
            conn.execute(text("GRANT EXECUTE ON FUNCTION pg_catalog.pg_advisory_xact_lock(bigint) TO PUBLIC"))
        grant.dispose()
        refused = sql(install, "SELECT 1", reader)
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 2 and "advisory locks" in said and "engine sql-role NAME" in said
        again = subprocess.run([sys.executable, "-m", "engine", "sql-role", role], env=install.env(),
                               capture_output=True, text=True, timeout=120, cwd=install.folder)
        assert again.returncode == 0, again.stderr  # mended: the reading below goes on
        assert "kept" in sql(install, "SELECT job_id FROM session_status", reader).stdout
        assert not marker.exists() and event_count(install) == before
        assert install.store.verify() == []
    finally:
        install.store.close()
        _drop(admin, name)
        from sqlalchemy import create_engine, text

        cleanup = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with cleanup.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        cleanup.dispose()


def test_the_sqlite_file_is_opened_read_only_by_its_quoted_uri(tmp_path):
    from engine.store.console import sqlite_path

    path = tmp_path / "a#b?c" / "engine.db"
    from engine.config import load_config

    config_file = tmp_path / "a#b?c" / "config.toml"
    config_file.parent.mkdir()
    config_file.write_text("")
    assert Path(sqlite_path(load_config(config_file).database_url)) == path


def _bounded_reader(tmp_path, backend: str):
    """An installation (SQLite, or PostgreSQL with a reading role) and the environment of its engine sql."""
    if backend == "sqlite":
        return Installation(tmp_path / "engine"), {}, None
    if not POSTGRES_URL:
        pytest.skip("ENGINE_TEST_POSTGRES_URL is not set")
    admin, name, url = _postgres_database()
    install = Installation(tmp_path / "engine", database_url=url)
    role = f"reader_{uuid.uuid4().hex[:8]}"
    made = subprocess.run([sys.executable, "-m", "engine", "sql-role", role], env=install.env(), capture_output=True,
                          text=True, timeout=120, cwd=install.folder)
    assert made.returncode == 0, made.stderr
    return install, {"ENGINE_DATABASE_READONLY_URL": made.stdout.strip()}, (admin, name, role)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_engine_sql_bounds_rows_values_bytes_and_the_whole_commands_time_and_says_so(tmp_path, backend):
    """As an attacker with a reading role tried it: a billion-character value, a hundred million rows,
    a long stream. Each is cut or stopped at its bound, said on stderr, in bounded memory and time."""
    install, reader, cleanup = _bounded_reader(tmp_path, backend)
    many = ("SELECT g FROM generate_series(1, 100000000) g" if backend == "postgres" else
            "WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n) SELECT g FROM n")
    huge = "SELECT repeat('x', 100000000) AS big" if backend == "postgres" else "SELECT replace(hex(zeroblob(30000000)), '0', 'x') AS big"
    bounds = {"ENGINE_DATABASE_SQL_MAX_ROWS": "1000", "ENGINE_DATABASE_SQL_MAX_VALUE_BYTES": "5000",
              "ENGINE_DATABASE_SQL_MAX_BYTES": "100000", "ENGINE_DATABASE_SQL_TIMEOUT_SECONDS": "60"}
    try:
        rows = sql(install, many.replace("100000000", "20000") + " -- a comment closes the line", {**reader, **bounds})
        assert rows.returncode == 0 and "sql_max_rows" in rows.stderr, rows.stderr
        assert len([line for line in rows.stdout.splitlines() if line.strip(" │|").strip().isdigit()]) <= 1000
        done = subprocess.run([sys.executable, "-m", "engine", "sql", huge, "--json"],
                              env={**install.env(), **reader, **bounds}, capture_output=True, text=True,
                              timeout=120, cwd=install.folder)
        assert done.returncode == 0 and "sql_max_value_bytes" in done.stderr, done.stderr
        import json

        (value,) = json.loads(done.stdout)[0].values()
        assert set(value) == {"x"} and len(value) == 5000
        wide = sql(install, "SELECT 'y' || g AS t FROM " + (
            "generate_series(1, 5000) g" if backend == "postgres" else
            "(WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n LIMIT 5000) SELECT g FROM n)"),
            {**reader, **bounds, "ENGINE_DATABASE_SQL_MAX_BYTES": "2000"})
        assert wide.returncode == 0 and "sql_max_bytes" in wide.stderr, wide.stderr
        started = time.monotonic()
        endless = sql(install, many, {**reader, **bounds, "ENGINE_DATABASE_SQL_MAX_ROWS": "100000000",
                                      "ENGINE_DATABASE_SQL_MAX_BYTES": "100000000000",
                                      "ENGINE_DATABASE_SQL_TIMEOUT_SECONDS": "2"})
        assert endless.returncode == 1 and "TIMEOUT" in endless.stderr and "Traceback" not in endless.stderr
        assert time.monotonic() - started < 30
    finally:
        install.store.close()
        if cleanup:
            admin, name, role = cleanup
            _drop(admin, name)
            from sqlalchemy import create_engine, text

            dropper = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
            with dropper.connect() as conn:
                conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
            dropper.dispose()
