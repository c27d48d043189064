"""`engine sql`: read-only SQL for users and scripts, read-only by construction on both stores.

One statement, parsed by the database itself, never a pattern match on the text:
- SQLite: the file is opened read-only (`mode=ro`, its path URI-quoted); the sqlite3 module runs
  exactly one statement; an authorizer allows reading only (no writes, ATTACH, writing pragmas,
  and none of the functions that reach outside the database or leak process memory, such as
  `fts3_tokenizer`); a progress handler stops a statement past the time limit, so a runaway
  query never holds a read transaction (and so the WAL) open while runners write.
- PostgreSQL: the statement is sent through the extended protocol as the body of `PREPARE`, which
  the server accepts for one SELECT, VALUES, INSERT, UPDATE, DELETE or MERGE only; it runs in a
  READ ONLY transaction (the session's default too) under `statement_timeout`. A superuser (or a
  role that may read server files or run programs) is refused: such a role can undo any of this
  from inside a SELECT. `[database] readonly_url` names the role to use; `engine sql-role NAME`
  makes one that can only read.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

from engine.config import Config
from engine.errors import EngineError, Timeout, ValidationError
from engine.store.errors import translate

log = logging.getLogger("engine.sql")

# Pragmas that only read; any other pragma (or a pragma with an assignment) is refused.
READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list", "database_list",
                "compile_options", "user_version", "schema_version", "page_count", "page_size", "freelist_count",
                "journal_mode", "synchronous", "integrity_check", "quick_check", "function_list", "table_list"}
# Functions that reach outside the database or the statement: fts3_tokenizer returns (and takes) a
# pointer into the process; the rest read or write files or load code where the build has them.
DENIED_FUNCTIONS = {"fts3_tokenizer", "load_extension", "readfile", "writefile", "edit", "fsdir", "zipfile",
                    "sqlar_compress", "sqlar_uncompress"}
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE}
MAX_VALUE_BYTES = 64 * 1024 * 1024  # the longest string or blob a statement may build (zeroblob(1e12)...)
READ_ONLY_HINT = ("refused: engine sql is read-only; it runs one SELECT (WITH ... SELECT, VALUES, or a reading PRAGMA) and "
                  "nothing that writes or reaches outside the database")
# Roles that can read server files or run programs whatever the transaction says.
POWERFUL_ROLES = ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program")


class ReadOnly(ValidationError):
    """A statement engine sql will not run (it writes, or reaches outside the database)."""


def _authorizer(action: int, arg1: Any, arg2: Any, _db: Any, _trigger: Any) -> int:
    if action in _ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if str(arg2).lower() in DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() in READ_PRAGMAS and arg2 is None:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def run_sql(config: Config, query: str) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement; returns (column names, rows). The caller has checked that
    the installation exists (engine.face.operate.sql)."""
    timeout = float(config.get("database", "sql_timeout_seconds"))
    url = config.get("database", "readonly_url") or config.database_url
    if url.startswith("sqlite"):
        return _run_sqlite(url, query, timeout)
    return _run_postgres(url, query, timeout)


def sqlite_path(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).database or ""


def _run_sqlite(url: str, query: str, timeout: float) -> tuple[list[str], list[tuple]]:
    from pathlib import Path

    path = Path(sqlite_path(url)).resolve()
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout
    try:
        conn.set_authorizer(_authorizer)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            cursor = conn.execute(query)
            columns = [d[0] for d in cursor.description or []]
            return columns, cursor.fetchall()
        except sqlite3.DatabaseError as exc:
            if "one statement at a time" in str(exc):
                raise ValidationError(f"engine sql runs exactly one statement ({exc})") from exc
            if "interrupted" in str(exc) and time.monotonic() > deadline:
                raise Timeout(f"the statement ran past [database] sql_timeout_seconds ({timeout:g} s) and was "
                              "stopped") from exc
            if "not authorized" in str(exc) or "readonly" in str(exc).replace(" ", ""):
                raise ReadOnly(f"{READ_ONLY_HINT} ({exc})") from exc
            raise ValidationError(f"invalid SQL: {exc}") from exc
    finally:
        conn.close()


def _run_postgres(url: str, query: str, timeout: float) -> tuple[list[str], list[tuple]]:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import DBAPIError

    engine = create_engine(url, connect_args={"options": "-c default_transaction_read_only=on"})
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.rollback()
            raw.autocommit = True  # the transaction below is begun by hand, READ ONLY
            check_role(raw)
            with raw.cursor() as cursor:
                try:
                    cursor.execute("BEGIN READ ONLY")
                    cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
                    # The extended protocol takes one command; PREPARE takes only a query.
                    cursor.execute(f"PREPARE engine_sql AS {query}", prepare=True)
                    cursor.execute("EXECUTE engine_sql")
                    columns = [d.name for d in cursor.description or []]
                    rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
                except Exception as exc:
                    raise _postgres_error(exc, timeout) from exc
                finally:
                    cursor.execute("ROLLBACK")
            return columns, rows
    except DBAPIError as exc:
        raise translate(exc) from exc
    finally:
        engine.dispose()


def _postgres_error(exc: Exception, timeout: float) -> EngineError:
    import psycopg

    state = getattr(exc, "sqlstate", None) or ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if state == "57014":  # query_canceled: the statement timeout
        return Timeout(f"the statement ran past [database] sql_timeout_seconds ({timeout:g} s) and was stopped")
    if state in ("25006", "42501") or state.startswith("42501"):  # read_only_sql_transaction, insufficient_privilege
        return ReadOnly(f"{READ_ONLY_HINT} ({message})")
    if "multiple commands" in message:
        return ValidationError(f"engine sql runs exactly one statement ({message})")
    if isinstance(exc, psycopg.errors.SyntaxError):
        return ReadOnly(f"{READ_ONLY_HINT}, or the SQL is invalid ({message})")
    if isinstance(exc, psycopg.Error):
        return ValidationError(f"invalid SQL: {message}")
    return EngineError(f"{type(exc).__name__}: {message}")


def check_role(raw) -> None:
    """Refuse a role that can undo a read-only transaction from inside a SELECT; warn loudly about
    one that can write the event log (it still runs read-only)."""
    with raw.cursor() as cursor:
        cursor.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
        user, superuser = cursor.fetchone()
        powers = []
        for role in POWERFUL_ROLES:
            cursor.execute("SELECT pg_has_role(current_user, %s, 'USAGE')", (role,))
            if cursor.fetchone()[0]:
                powers.append(role)
        cursor.execute("SELECT has_table_privilege(current_user, 'events', 'INSERT, UPDATE, DELETE, TRUNCATE')")
        writes = cursor.fetchone()[0]
    if superuser or powers:
        what = "a superuser" if superuser else f"a member of {', '.join(powers)}"
        raise ReadOnly(
            f"engine sql refuses to run as {user!r}, {what}: such a role can read server files and run programs "
            "from inside a SELECT, whatever engine sql sets. Make a role that can only read with "
            "`engine sql-role NAME` and put the URL it prints in [database] readonly_url "
            "(or ENGINE_DATABASE_READONLY_URL)")
    if writes:
        log.warning("engine sql runs as %r, a role that can write the event log: the statement runs in a read-only "
                    "transaction, but give consoles a role that can only read (`engine sql-role NAME`, then "
                    "[database] readonly_url)", user)


def create_reader(config: Config, name: str, password: str | None) -> str:
    """Create (or bring up to date) a PostgreSQL role that can only read this database, through the
    store's own URL; returns the URL to put in [database] readonly_url."""
    import re

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = config.database_url
    if not url.startswith("postgresql"):
        raise ValidationError("engine sql-role is for PostgreSQL: on SQLite engine sql opens the file read-only")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValidationError(f"role name {name!r}: lower-case letters, digits and _ (at most 63)")
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            database = conn.execute(text("SELECT current_database()")).scalar_one()
            schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}).first()
            if not exists:
                conn.execute(text(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION'))
            if password is not None:
                conn.execute(text(f'ALTER ROLE "{name}" PASSWORD :p'), {"p": password})
            for statement in (
                    f'GRANT CONNECT ON DATABASE "{database}" TO "{name}"',
                    f'GRANT USAGE ON SCHEMA "{schema}" TO "{name}"',
                    f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{name}"',
                    f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT SELECT ON TABLES TO "{name}"',
                    f'ALTER ROLE "{name}" SET default_transaction_read_only = on'):
                conn.execute(text(statement))
    finally:
        engine.dispose()
    reader = make_url(url).set(username=name, password=password)
    return reader.render_as_string(hide_password=False)
