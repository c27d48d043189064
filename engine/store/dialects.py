"""The small ways SQLite and PostgreSQL differ: connecting, beginning a writer, claiming a step."""

from __future__ import annotations

from sqlalchemy import bindparam, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select

from engine.store.tables import sessions, steps


def claim_candidates() -> Select:
    """Pending steps whose predecessors are done, highest priority first, then the oldest.
    Bound parameter: `now` (epoch seconds; steps waiting out a retry backoff are not yet due)."""
    now = bindparam("now")
    return (
        select(steps.c.session_id, steps.c.step_index)
        .join(sessions, sessions.c.session_id == steps.c.session_id)
        .where(
            sessions.c.status.in_(("pending", "running")),
            steps.c.status == "pending",
            steps.c.step_index == sessions.c.current_step,
            (steps.c.not_before.is_(None)) | (steps.c.not_before <= now),
        )
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

    claim_query = claim_candidates().with_for_update(of=steps, skip_locked=True)


def dialect_for(url: str, synchronous: str, busy_timeout_ms: int):
    if url.startswith("sqlite"):
        return SqliteDialect(synchronous, busy_timeout_ms)
    if url.startswith("postgresql"):
        return PostgresDialect()
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql+psycopg://")
