"""`engine sql`: read-only SQL for users and scripts. Writes, ATTACH and writing pragmas are refused."""

from __future__ import annotations

import sqlite3
from typing import Any

from engine.config import Config
from engine.errors import ValidationError

# Pragmas that only read; any other pragma (or a pragma with an assignment) is refused.
READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list", "database_list",
                "compile_options", "user_version", "schema_version", "page_count", "page_size", "freelist_count",
                "journal_mode", "synchronous", "integrity_check", "quick_check", "function_list", "table_list"}

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _authorizer(action: int, arg1: Any, arg2: Any, _db: Any, _trigger: Any) -> int:
    if action in _ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() in READ_PRAGMAS and arg2 is None:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def run_sql(config: Config, query: str) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement; returns (column names, rows)."""
    from engine.app import require_installation

    require_installation(config)
    url = config.database_url
    if url.startswith("sqlite"):
        path = config.path("database") if not config.get("database", "url") else url.split("///", 1)[1]
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            conn.set_authorizer(_authorizer)
            try:
                cursor = conn.execute(query)
            except sqlite3.DatabaseError as exc:
                raise ValidationError(f"refused or invalid SQL: {exc}") from exc
            columns = [d[0] for d in cursor.description or []]
            return columns, cursor.fetchall()
        finally:
            conn.close()
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            try:
                result = conn.execute(text(query))
            except DBAPIError as exc:
                raise ValidationError(f"refused or invalid SQL: {exc.orig}") from exc
            columns = list(result.keys()) if result.returns_rows else []
            rows = [tuple(r) for r in result] if result.returns_rows else []
            conn.rollback()
            return columns, rows
    finally:
        engine.dispose()
