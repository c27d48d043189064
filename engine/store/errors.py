"""The store's own errors: what a driver raised, translated once, here. Nothing outside `store/`
imports a driver's exceptions; it catches these (their base: `StoreError`).

PostgreSQL is read by SQLSTATE, SQLite by its extended result code (`sqlite_errorcode`), each with
the driver's message as a last resort for an older driver that does not carry the code.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from engine.errors import EngineError

# What a driver raises, as SQLAlchemy wraps it or bare (a raw DB-API connection), and SQLAlchemy's
# pool when every connection is taken.
DRIVER_ERRORS = (DBAPIError, sqlite3.Error, PoolTimeout)


class StoreError(EngineError):
    """The database's trouble, not the caller's: a step that meets it is retried, a file is not
    counted against. `cause` is the driver's error."""

    code = "DATABASE_ERROR"

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class StoreUnavailable(StoreError):
    """The database cannot be reached (refused, killed connections, a restarting server)."""

    code = "DATABASE_UNAVAILABLE"


class StoreBusy(StoreError):
    """Another program holds the write lock longer than the busy timeout: wait and try again."""


class StoreConflict(StoreError):
    """Another writer won a race (a serialization failure, a deadlock): try the transaction again."""


class UniqueViolation(StoreConflict):
    """A row with this key exists already (two writers inserted it at once)."""


# SQLSTATE classes and codes that mean the connection (not the statement) failed: connection
# exceptions, admin/crash shutdown, cannot connect now.
LOST_STATES = ("08", "57P01", "57P02", "57P03")
BUSY_STATES = ("55P03",)  # lock_not_available
CONFLICT_STATES = ("40001", "40P01")  # serialization_failure, deadlock_detected
UNIQUE_STATES = ("23505",)
# SQLite's primary result codes (the low byte of the extended code).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CONSTRAINT = 5, 6, 19
SQLITE_UNIQUE = (1555, 2067)  # SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE

LOST_WORDS = ("server closed the connection", "connection refused", "terminating connection", "connection is closed",
              "could not connect", "connection failed", "consuming input failed")
BUSY_WORDS = ("database is locked", "database table is locked", "could not obtain lock", "lock timeout",
              "database is busy")
CONFLICT_WORDS = ("deadlock", "could not serialize")
UNIQUE_WORDS = ("duplicate key", "unique constraint")


def first_line(exc: BaseException) -> str:
    """The driver's error in one line: its class and the first line of its message."""
    orig = getattr(exc, "cause", None) or getattr(exc, "orig", None) or exc
    orig = getattr(orig, "orig", None) or orig
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"


def kind_of(exc: BaseException) -> type[StoreError]:
    """Which StoreError a driver's error is."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return StoreUnavailable
    if isinstance(exc, PoolTimeout):  # every pooled connection is in use: wait for one
        return StoreBusy
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None) or ""
    code = getattr(orig, "sqlite_errorcode", None)
    message = str(orig).lower()
    if state.startswith(LOST_STATES) or any(words in message for words in LOST_WORDS):
        return StoreUnavailable
    if state in UNIQUE_STATES or code in SQLITE_UNIQUE:
        return UniqueViolation
    if state in CONFLICT_STATES or any(word in message for word in CONFLICT_WORDS):
        return StoreConflict
    if state in BUSY_STATES or (code is not None and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)) \
            or any(word in message for word in BUSY_WORDS):
        return StoreBusy
    if code is None and not state and any(word in message for word in UNIQUE_WORDS):
        return UniqueViolation
    return StoreError


def translate(exc: BaseException) -> StoreError:
    """The engine's error for a driver's (a StoreError is returned as it is)."""
    if isinstance(exc, StoreError):
        return exc
    kind = kind_of(exc)
    message = {StoreUnavailable: "cannot reach the database", StoreBusy: "the database is locked by another program",
               StoreConflict: "another writer got in the way", UniqueViolation: "the row exists already",
               StoreError: "database error"}[kind]
    return kind(f"{message}: {first_line(exc)}", exc)
