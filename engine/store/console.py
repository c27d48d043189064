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
  from inside a SELECT; so is a role that may take the engine's advisory locks (it could stall the
  inbox). `[database] readonly_url` names the role to use; `engine sql-role NAME` makes one that
  can only read.
- Both: the answer is read a row at a time within `Bounds` (rows, bytes, one value's length, the
  whole command's time); PostgreSQL cuts long values itself, so they never reach this process.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine.config import Config
from engine.errors import EngineError, Timeout, ValidationError
from engine.store.errors import first_line

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
# The advisory locks the engine takes turns by (a submit, an ingest, an owner's limits): a reader
# that could take them could hold up the inbox and every submit from inside a SELECT. In this
# database only the engine's own role may (engine sql-role revokes them from PUBLIC).
ADVISORY_LOCKS = tuple(f"pg_catalog.{name}({arguments})"
                       for name in ("pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock",
                                    "pg_advisory_xact_lock_shared", "pg_try_advisory_lock",
                                    "pg_try_advisory_lock_shared", "pg_try_advisory_xact_lock",
                                    "pg_try_advisory_xact_lock_shared")
                       for arguments in ("bigint", "integer, integer"))


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


@dataclass(frozen=True)
class Bounds:
    """What one `engine sql` may take: seconds for the whole command, rows, characters (or bytes)
    of one value, bytes of the whole answer ([database] sql_timeout_seconds, sql_max_rows,
    sql_max_value_bytes, sql_max_bytes)."""

    seconds: float
    rows: int
    value: int
    total: int

    @classmethod
    def of(cls, config: Config) -> "Bounds":
        return cls(float(config.get("database", "sql_timeout_seconds")), int(config.get("database", "sql_max_rows")),
                   int(config.get("database", "sql_max_value_bytes")), int(config.get("database", "sql_max_bytes")))


class Collected:
    """The rows of an answer as they come, within its Bounds: a value longer than the bound is cut
    (and counted); past the rows or the bytes it stops, saying why; past the time, TIMEOUT."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds, self.rows, self.bytes, self.cut_values = bounds, [], 0, 0
        self.deadline = time.monotonic() + bounds.seconds
        self.stopped: str | None = None

    def take(self, row: tuple, cut: int = 0) -> bool:
        """Keep this row (`cut`: how many of its values the database cut already); False: stop here."""
        if time.monotonic() > self.deadline:
            raise Timeout(f"the statement ran past [database] sql_timeout_seconds ({self.bounds.seconds:g} s) and was "
                          "stopped")
        if len(self.rows) >= self.bounds.rows:
            self.stopped = f"stopped after {len(self.rows)} rows ([database] sql_max_rows); add a LIMIT or a WHERE"
            return False
        kept = tuple(self._bounded(value) for value in row)
        size = sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in kept)
        if self.bytes + size > self.bounds.total:
            self.stopped = (f"stopped after {len(self.rows)} rows: the answer reached [database] sql_max_bytes "
                            f"({self.bounds.total} bytes)")
            return False
        self.rows.append(kept)
        self.bytes += size
        self.cut_values += cut
        return True

    def _bounded(self, value):
        if isinstance(value, (str, bytes, memoryview)) and len(value) > self.bounds.value:
            self.cut_values += 1
            return value[: self.bounds.value]
        return value

    def notes(self) -> list[str]:
        said = [self.stopped] if self.stopped else []
        if self.cut_values:
            said.append(f"{self.cut_values} value(s) longer than [database] sql_max_value_bytes "
                        f"({self.bounds.value}) were cut to it")
        return said


def run_sql(config: Config, query: str, say: Callable[[str], None] | None = None) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement; returns (column names, rows), within the Bounds of this
    config; what was cut or where it stopped is said to `say` (logged when None). The caller has
    checked that the installation exists (engine.face.operate.sql)."""
    bounds = Bounds.of(config)
    url = config.get("database", "readonly_url") or config.database_url
    collected = Collected(bounds)
    if url.startswith("sqlite"):
        columns = _run_sqlite(url, query, bounds.seconds, collected)
    else:
        columns = _run_postgres(url, query, collected)
    for note in collected.notes():
        (say or log.warning)(note)
    return columns, collected.rows


def sqlite_path(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).database or ""


def _run_sqlite(url: str, query: str, timeout: float, collected: Collected) -> list[str]:
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
            for row in cursor:
                if not collected.take(row):
                    break
            return columns
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


def _run_postgres(url: str, query: str, collected: Collected) -> list[str]:
    """The statement, PREPAREd (so one query only) in a READ ONLY transaction under a statement
    timeout of the time left, then run again wrapped so the server itself cuts long values (the
    text of a value past sql_max_value_bytes never leaves it), its rows streamed one at a time
    within the Bounds. Stopping early cancels the statement and drops the connection."""
    import psycopg

    timeout = collected.bounds.seconds
    raw = _connect(url, timeout)
    try:
        check_role(raw)
        with raw.cursor() as cursor:
            try:
                cursor.execute("BEGIN READ ONLY")
                cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
                # The extended protocol takes one command; PREPARE takes only a query.
                cursor.execute(f"PREPARE engine_sql AS {query}", prepare=True)
                described = raw.pgconn.describe_prepared(b"engine_sql")
                fields = [(described.fname(i).decode(errors="replace"), described.ftype(i))
                          for i in range(described.nfields)]
                statement = "EXECUTE engine_sql"
                if fields:
                    cursor.execute("SAVEPOINT engine_bounded")
                    try:
                        cursor.execute(f"PREPARE engine_bounded AS {_bounded(query, fields, collected.bounds.value)}",
                                       prepare=True)
                        statement = "EXECUTE engine_bounded"
                    except psycopg.Error:  # not a query a FROM takes: values are cut here instead
                        cursor.execute("ROLLBACK TO SAVEPOINT engine_bounded")
                columns = [name for name, _ in fields]
                stream = cursor.stream(statement)
                for row in stream:
                    values, flags = (row[: len(fields)], row[len(fields):]) if statement.endswith("bounded") \
                        else (row, ())
                    if not collected.take(tuple(values), sum(1 for f in flags if f)):
                        raw.cancel_safe(timeout=5)
                        raw.close()  # the rest is not read (reading it to its end could take minutes)
                        break
                return columns
            except Timeout:
                raw.cancel_safe(timeout=5)
                raw.close()
                raise
            except psycopg.Error as exc:
                raise _postgres_error(exc, timeout) from exc
            finally:
                if not raw.closed:
                    try:
                        cursor.execute("ROLLBACK")
                    except psycopg.Error:  # cancelled, or the server went: the connection is dropped below
                        pass
    finally:
        raw.close()


def _connect(url: str, timeout: float):
    """A psycopg connection of this URL, in autocommit (the transaction is begun by hand, READ
    ONLY; its session's default is read-only too); the store's error when it cannot be had."""
    import psycopg
    from sqlalchemy.engine import make_url

    from engine.store.errors import StoreUnavailable

    parts = make_url(url)
    try:
        return psycopg.connect(host=parts.host, port=parts.port, user=parts.username, password=parts.password,
                               dbname=parts.database, autocommit=True, connect_timeout=max(1, int(timeout)),
                               options="-c default_transaction_read_only=on", **dict(parts.query))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot reach the database: {first_line(exc)}") from None


TEXT_TYPES = {25, 1042, 1043, 19, 705}  # text, char(n), varchar, name, unknown
BYTEA = 17


def _bounded(query: str, fields: list[tuple[str, int]], limit: int) -> str:
    """The query as a subquery whose text and bytea values are cut to `limit` by the server, and
    others past it given as NULL, each column followed at the end by whether it was cut."""
    inner = ", ".join(f"c{i}" for i in range(len(fields)))
    values, flags = [], []
    for i, (name, oid) in enumerate(fields):
        column = f"q.c{i}"
        shown = name.replace('"', '""')
        if oid in TEXT_TYPES:
            values.append(f'left({column}::text, {limit}) AS "{shown}"')
            flags.append(f"char_length({column}::text) > {limit}")
        elif oid == BYTEA:
            values.append(f'substring({column} from 1 for {limit}) AS "{shown}"')
            flags.append(f"octet_length({column}) > {limit}")
        else:
            values.append(f'CASE WHEN pg_column_size({column}) > {limit} THEN NULL ELSE {column} END AS "{shown}"')
            flags.append(f"pg_column_size({column}) > {limit}")
    # The newline ends a comment the query may close with.
    return f"SELECT {', '.join(values + [f'{flag} AS engine_cut_{i}' for i, flag in enumerate(flags)])} " \
           f"FROM ({query}\n) AS q({inner})"


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
        cursor.execute("SELECT has_function_privilege(current_user, 'pg_catalog.pg_advisory_xact_lock(bigint)', "
                       "'EXECUTE')")
        locks = cursor.fetchone()[0]
    if superuser or powers:
        what = "a superuser" if superuser else f"a member of {', '.join(powers)}"
        raise ReadOnly(
            f"engine sql refuses to run as {user!r}, {what}: such a role can read server files and run programs "
            "from inside a SELECT, whatever engine sql sets. Make a role that can only read with "
            "`engine sql-role NAME` and put the URL it prints in [database] readonly_url "
            "(or ENGINE_DATABASE_READONLY_URL)")
    if locks and not writes:
        raise ReadOnly(
            f"engine sql refuses to run as {user!r}: it can take the advisory locks the engine takes turns by, and so "
            "hold up the inbox and every submit from inside a SELECT. Run `engine sql-role NAME` (again, for a role "
            "made before, with the store's superuser URL): in this database it leaves those locks to the engine's "
            "own role")
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
            engine_role = conn.execute(text("SELECT current_user")).scalar_one()
            for function in ADVISORY_LOCKS:  # the engine's turns are its own (see ADVISORY_LOCKS)
                conn.execute(text(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC"))
                conn.execute(text(f'GRANT EXECUTE ON FUNCTION {function} TO "{engine_role}"'))
    finally:
        engine.dispose()
    reader = make_url(url).set(username=name, password=password)
    return reader.render_as_string(hide_password=False)
