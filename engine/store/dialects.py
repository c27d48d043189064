"""The small ways SQLite and PostgreSQL differ: connecting, beginning a writer, claiming a step,
and how the store's hot statements are executed.

The hot statements (projection reads and writes, event inserts, claims, leases) are SQLAlchemy Core
statements built once. PostgreSQL executes them through SQLAlchemy. On SQLite, where a runner's
step costs little more than the statements' own bookkeeping, they are compiled once by SQLAlchemy
and run on the connection's DBAPI cursor, inside the same transaction. Their columns are plain
integers, floats and text, so there is no type processing to skip.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import bindparam, event, or_, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Executable, Select

Row = dict[str, Any]

from engine.store.tables import sessions, steps


def runs_here():
    """Sessions the claiming worker's device may run: pinned to nothing, to its id, its kind or its
    kind's alias (bound `pin_id`, `pin_kind`, `pin_alias`), or any when `any_device` is 1."""
    return or_(bindparam("any_device") == 1, sessions.c.device == "", sessions.c.device == bindparam("pin_id"),
               sessions.c.device == bindparam("pin_kind"), sessions.c.device == bindparam("pin_alias"))


def claim_candidates() -> Select:
    """The first `n` ready sessions this worker may run, highest priority first, then the oldest;
    the current step of the one taken is the one to run (the steps before it are done). Bound
    parameter `now`: a retry's backoff must have passed. An index on (ready, priority DESC,
    created_event) makes this the first rows of one index scan."""
    return (
        select(sessions.c.session_id, sessions.c.current_step.label("step_index"), sessions.c.group_key,
               sessions.c.updated_at, sessions.c.priority, sessions.c.model, sessions.c.owner)
        .where(sessions.c.ready == 1, sessions.c.ready_at <= bindparam("now"), runs_here())
        .order_by(sessions.c.priority.desc(), sessions.c.created_event.asc())
        .limit(bindparam("n"))
    )


def owner_candidates(running_only: bool = False) -> Select:
    """claim_candidates of one owner (bound `owner`) at one priority (bound `priority`): its turn in
    the fair share. `running_only`: an owner at its max_running starts no new session, but the
    sessions it has in progress go on."""
    query = claim_candidates().where(sessions.c.owner == bindparam("owner"), sessions.c.priority == bindparam("priority"))
    return query.where(sessions.c.status == "running") if running_only else query


def partner_candidates() -> Select:
    """Ready sessions whose current step has the leader's compatibility key, in queue order."""
    return (
        select(sessions.c.session_id)
        .where(sessions.c.group_key == bindparam("group"), sessions.c.ready == 1,
               sessions.c.ready_at <= bindparam("now"), runs_here())
        .order_by(sessions.c.priority.desc(), sessions.c.created_event.asc())
        .limit(bindparam("n"))
    )


def follower_candidates() -> Select:
    """A ready session whose current step cannot join the group yet but a later step of which could:
    running its current step first lets it join the call."""
    return (
        select(sessions.c.session_id, sessions.c.current_step.label("step_index"))
        .join(steps, steps.c.session_id == sessions.c.session_id)
        .where(steps.c.group_key == bindparam("group"), steps.c.status == "pending",
               steps.c.step_index > sessions.c.current_step, sessions.c.ready == 1,
               sessions.c.ready_at <= bindparam("now"), runs_here())
        .order_by(sessions.c.priority.desc(), sessions.c.created_event.asc())
        .limit(1)
    )


class Dialect:
    """Executing the store's prepared statements through SQLAlchemy (any database)."""

    name = ""

    def fetch_one(self, conn: Connection, stmt: Executable, params: dict[str, Any]) -> Row | None:
        row = conn.execute(stmt, params).mappings().first()
        return dict(row) if row is not None else None

    def fetch_all(self, conn: Connection, stmt: Executable, params: dict[str, Any]) -> list[Row]:
        return [dict(row) for row in conn.execute(stmt, params).mappings()]

    def execute(self, conn: Connection, stmt: Executable, params: dict[str, Any]) -> int:
        """Run one statement; the number of rows it changed."""
        return conn.execute(stmt, params).rowcount

    def execute_many(self, conn: Connection, stmt: Executable, rows: list[dict[str, Any]]) -> None:
        conn.execute(stmt, rows)

    def insert_id(self, conn: Connection, stmt: Executable, params: dict[str, Any]) -> int:
        """Insert one row; its generated primary key."""
        return conn.execute(stmt, params).inserted_primary_key[0]

    def serialize(self, conn: Connection, key: str) -> None:
        """Make writers that name the same key take turns until this transaction ends."""


class SqliteDialect(Dialect):
    name = "sqlite"

    def __init__(self, synchronous: str, busy_timeout_ms: int) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"database.synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous}")
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self._prepared: dict[tuple, tuple[Executable, str, tuple[str, ...], dict[str, Any]]] = {}
        self._sa_dialect = None

    def install(self, engine: Engine, writer: bool) -> None:
        """Pragmas on every connection; writers take the write lock at BEGIN (IMMEDIATE)."""

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {self.synchronous}")
            cursor.close()

        begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.connection.driver_connection.execute(begin)

        self._sa_dialect = engine.dialect

    def _cursor_call(self, conn: Connection, stmt: Executable, params: dict[str, Any]):
        """(DBAPI cursor, SQL, positional values) for a statement compiled once per set of keys."""
        key = (id(stmt), tuple(params))
        prepared = self._prepared.get(key)
        if prepared is None:
            compiled = stmt.compile(dialect=self._sa_dialect, column_keys=list(params))
            defaults = {name: bind.value for name, bind in compiled.binds.items() if bind.value is not None}
            prepared = (stmt, compiled.string, tuple(compiled.positiontup or ()), defaults)
            self._prepared[key] = prepared  # the statement is kept, so its id stays its own
        _, sql, names, defaults = prepared
        values = tuple(params[n] if n in params else defaults[n] for n in names)
        return conn.connection.driver_connection.cursor(), sql, values, names

    def fetch_one(self, conn, stmt, params):
        cursor, sql, values, _ = self._cursor_call(conn, stmt, params)
        row = cursor.execute(sql, values).fetchone()
        return dict(zip([d[0] for d in cursor.description], row)) if row is not None else None

    def fetch_all(self, conn, stmt, params):
        cursor, sql, values, _ = self._cursor_call(conn, stmt, params)
        rows = cursor.execute(sql, values).fetchall()
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return [dict(zip(columns, row)) for row in rows]

    def execute(self, conn, stmt, params):
        cursor, sql, values, _ = self._cursor_call(conn, stmt, params)
        return cursor.execute(sql, values).rowcount

    def execute_many(self, conn, stmt, rows):
        if not rows:
            return
        cursor, sql, _, names = self._cursor_call(conn, stmt, rows[0])
        cursor.executemany(sql, [tuple(row[n] for n in names) for row in rows])

    def insert_id(self, conn, stmt, params):
        cursor, sql, values, _ = self._cursor_call(conn, stmt, params)
        return cursor.execute(sql, values).lastrowid

    # The writer already holds SQLite's single write lock: no row locking needed.
    claim_query = claim_candidates()
    owner_query = owner_candidates()
    owner_running_query = owner_candidates(running_only=True)
    partners_query = partner_candidates()
    followers_query = follower_candidates()


class PostgresDialect(Dialect):
    name = "postgresql"

    def install(self, engine: Engine, writer: bool) -> None:
        return None

    def serialize(self, conn: Connection, key: str) -> None:
        """A transaction-level advisory lock on the key's hash (SQLite's writers take turns anyway)."""
        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": number})

    claim_query = claim_candidates().with_for_update(of=sessions, skip_locked=True)
    owner_query = owner_candidates().with_for_update(of=sessions, skip_locked=True)
    owner_running_query = owner_candidates(running_only=True).with_for_update(of=sessions, skip_locked=True)
    partners_query = partner_candidates().with_for_update(of=sessions, skip_locked=True)
    followers_query = follower_candidates().with_for_update(of=sessions, skip_locked=True)


def dialect_for(url: str, synchronous: str, busy_timeout_ms: int):
    if url.startswith("sqlite"):
        return SqliteDialect(synchronous, busy_timeout_ms)
    if url.startswith("postgresql"):
        return PostgresDialect()
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql+psycopg://")
