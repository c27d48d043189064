"""The small ways SQLite and PostgreSQL differ: connecting, beginning a writer, claiming a step."""

from __future__ import annotations

from sqlalchemy import bindparam, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select

from engine.store.tables import sessions


def claim_candidates() -> Select:
    """The ready session with the highest priority, then the oldest; its current step is the one to run
    (the steps before it are done). Bound parameter `now`: a retry's backoff must have passed.
    An index on (ready, priority DESC, created_event) makes this the first rows of one index scan."""
    return (
        select(sessions.c.session_id, sessions.c.current_step.label("step_index"))
        .where(sessions.c.ready == 1, sessions.c.ready_at <= bindparam("now"))
        .order_by(sessions.c.priority.desc(), sessions.c.created_event.asc())
        .limit(1)
    )


class SqliteDialect:
    name = "sqlite"

    def __init__(self, synchronous: str, busy_timeout_ms: int) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"database.synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous}")
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms

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

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    # The writer already holds SQLite's single write lock: no row locking needed.
    claim_query = claim_candidates()


class PostgresDialect:
    name = "postgresql"

    def install(self, engine: Engine, writer: bool) -> None:
        return None

    claim_query = claim_candidates().with_for_update(of=sessions, skip_locked=True)


def dialect_for(url: str, synchronous: str, busy_timeout_ms: int):
    if url.startswith("sqlite"):
        return SqliteDialect(synchronous, busy_timeout_ms)
    if url.startswith("postgresql"):
        return PostgresDialect()
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql+psycopg://")
