"""The event store: append events and update projections in one transaction; read streams.

This is the narrow interface the rest of the engine writes through. `Store.write(fn)` runs
`fn(tx)` in one writing transaction (retried on lock conflicts); inside it `tx.emit(...)`
appends one event and folds it through the reducer into the projections.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import create_engine, delete, func, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from engine.outage import Outage
from engine.store import reducer
from engine.store.dialects import dialect_for
from engine.store.errors import (DRIVER_ERRORS, StoreBusy, StoreConflict, StoreError, StoreUnavailable, first_line,
                                 translate)
from engine.store.events import Event, now_iso, storable
from engine.store.projection import INSERT as PROJECTION_INSERTS
from engine.store.projection import KEYS, PARENT, DatabaseProjection, MemoryProjection
from engine.store.tables import PROJECTIONS, events, leases

T = TypeVar("T")
log = logging.getLogger("engine.store")
INSERT_EVENT = insert(events)


class Tx:
    """One writing transaction: emitted events, their projection rows, and the connection."""

    def __init__(self, conn: Connection, store: "Store") -> None:
        self.conn = conn
        self.store = store
        self.projection = DatabaseProjection(conn, store.dialect)
        self.emitted: list[Event] = []

    def emit(self, stream_type: str, stream_id: str, type: str, data: dict[str, Any]) -> Event:
        """Append one event to its stream and fold it into the projections."""
        seq = reducer.stream_version(self.projection, stream_type, stream_id) + 1
        data = storable(data)  # a NUL or lone surrogate from a client's input never makes an event unstorable
        pending = Event(stream_type, stream_id, seq, type, data, now_iso())
        event_id = self.store.dialect.insert_id(self.conn, INSERT_EVENT, pending.row())
        event = Event(stream_type, stream_id, seq, type, data, pending.created_at, event_id)
        reducer.apply(self.projection, event)
        self.emitted.append(event)
        return event

    def get(self, table: str, key: tuple) -> dict | None:
        return self.projection.get(table, key)


class Store:
    """An engine's database: a writer pool, a reader pool and the dialect's hooks."""

    def __init__(self, url: str, synchronous: str = "FULL", busy_timeout_ms: int = 10000) -> None:
        self.url = url
        self.dialect = dialect_for(url, synchronous, busy_timeout_ms)
        self.writer = self._engine(writer=True)
        self.reader = self._engine(writer=False)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._writer_connections: list[Connection] = []
        self._lock_logged = 0.0
        self.reconnect_seconds = 30.0  # how long a write waits for a lost database (from_config sets it)
        self._lost = Outage(log, "writing to the database (its connection was lost; trying again on a new one)")
        # Called with the events of each committed write, after its commit (the outbox's result
        # files: engine.outbox.results). A hook's failure is logged; the write stays committed.
        self.after_commit: list[Callable[[list[Event]], None]] = []
        # Called with each writing transaction before it commits, once its own events are emitted:
        # what a hook emits commits with them or not at all (webhook deliveries: engine.notify).
        self.before_commit: list[Callable[[Tx], None]] = []

    def _engine(self, writer: bool) -> Engine:
        kwargs: dict[str, Any] = {}
        if self.dialect.name == "postgresql":
            kwargs["pool_pre_ping"] = True
        engine = create_engine(self.url, **kwargs)
        self.dialect.install(engine, writer)
        return engine

    @classmethod
    def from_config(cls, config) -> "Store":
        store = cls(config.database_url, config.get("database", "synchronous"),
                    config.get("database", "busy_timeout_ms"))
        store.reconnect_seconds = float(config.get("database", "reconnect_seconds"))
        return store

    def close(self) -> None:
        with self._lock:
            for conn in self._writer_connections:
                conn.close()
            self._writer_connections.clear()
        self._local = threading.local()
        self.writer.dispose()
        self.reader.dispose()

    def _writer_connection(self) -> Connection:
        """Each thread keeps its own writing connection (one database connection per thread)."""
        conn = getattr(self._local, "writer", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self.writer.connect()
            self._local.writer = conn
            with self._lock:
                self._writer_connections.append(conn)
        return conn

    # writing ---------------------------------------------------------------------------------

    def write(self, fn: Callable[[Tx], T]) -> T:
        """Run fn(tx) in one writing transaction; retried when another writer got in the way."""
        return self.write_events(fn)[0]

    def write_events(self, fn: Callable[[Tx], T]) -> tuple[T, list[Event]]:
        """Like `write`, also returning the events the transaction appended.

        A writer that cannot get the database's write lock (another program holds it longer than
        the busy timeout) waits and tries again for as long as it takes, saying so in the log; a
        conflict with another writer (two runners appending to one stream) is retried at once, a
        bounded number of times, and then reported."""
        waited_since: float | None = None
        lost_since: float | None = None
        conflicts = 0
        while True:
            tx = None
            committing = False
            try:
                conn = self._writer_connection()
                with conn.begin():
                    tx = Tx(conn, self)
                    result = fn(tx)
                    for hook in self.before_commit:
                        hook(tx)
                    tx.projection.flush()
                    committing = True
                if waited_since is not None:
                    log.warning("got the database write lock after %.1f s", time.monotonic() - waited_since)
                self._lost.ok()
                self._committed(tx.emitted)
                return result, tx.emitted
            except (*DRIVER_ERRORS, StoreError) as exc:
                if isinstance(exc, DBAPIError) and (exc.connection_invalidated or self._local_invalid()):
                    self._local.writer = None
                error = translate(exc)
                if isinstance(error, StoreBusy):
                    waited_since = self._wait_for_lock(waited_since)
                    continue
                if isinstance(error, StoreUnavailable) and not committing:  # rolled back with its connection: run again
                    lost_since = self._wait_for_database(lost_since, exc)
                    continue
                if isinstance(error, StoreUnavailable):  # the commit's answer was lost: it may have committed
                    raise StoreUnavailable(f"the database connection was lost while committing: {first_line(exc)}",
                                           exc) from exc
                conflicts += 1
                if not isinstance(error, StoreConflict) or conflicts >= 50:
                    raise error from exc
                time.sleep(min(0.005 * conflicts, 0.1))

    def _committed(self, emitted: list[Event]) -> None:
        if not emitted:
            return
        for hook in list(self.after_commit):
            try:
                hook(emitted)
            except Exception:
                log.exception("after a commit of %d event(s): %s failed", len(emitted), hook)

    def _local_invalid(self) -> bool:
        conn = getattr(self._local, "writer", None)
        return conn is not None and conn.invalidated

    def _wait_for_database(self, since: float | None, exc: BaseException) -> float:
        """One pause while the database cannot be reached (a killed connection, a restarting server);
        one log line when it starts; StoreUnavailable after `reconnect_seconds`."""
        now = time.monotonic()
        self._lost.failed(exc, traceback=False)
        if since is None:
            since = now
        elif now - since > self.reconnect_seconds:
            raise StoreUnavailable(f"the database cannot be reached (for {now - since:.0f} s): {first_line(exc)}",
                                   exc) from exc
        time.sleep(min(0.05 * 2 ** min(int(now - since), 5), 1.0) + random.random() * 0.05)
        return since

    def _wait_for_lock(self, since: float | None) -> float:
        """One pause while another program holds the write lock; logs every half minute."""
        now = time.monotonic()
        if since is None:
            log.warning("the database is locked by another program; waiting for it")
            since, self._lock_logged = now, now
        elif now - self._lock_logged >= 30:
            log.warning("still waiting for the database write lock (%.0f s so far)", now - since)
            self._lock_logged = now
        time.sleep(0.05 + random.random() * 0.2)
        return since

    # reading ---------------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A reading connection; a driver's error inside the block comes out as a StoreError."""
        try:
            with self.reader.connect() as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    def newest_event_id(self) -> int:
        """The log's newest event id (0 when empty): one cheap read, its primary key's end, that
        says whether anything happened since it was last asked."""
        with self.read() as conn:
            return conn.execute(select(func.max(events.c.event_id))).scalar() or 0

    def row(self, table: str, key: tuple, children: str | None = None) -> Any:
        """One projection row (sessions, batches, ...) by its primary key, as committed, or None;
        with `children` ("steps" of a session, "items" of a batch), (the row, its children in key
        order), read in one transaction: as one commit left them."""
        t = PROJECTIONS[table]
        with self.read() as conn:
            found = conn.execute(select(t).where(*[t.c[k] == v for k, v in zip(KEYS[table], key)])).mappings().first()
            row = dict(found) if found is not None else None
            if children is None:
                return row
            c = PROJECTIONS[children]
            below = [dict(r) for r in conn.execute(select(c).where(c.c[PARENT[children]] == key[0])
                                                   .order_by(*[c.c[k] for k in KEYS[children]])).mappings()]
        return row, below

    def events_after(self, after: int, limit: int = 1000, types: tuple[str, ...] | None = None,
                     streams: set[str] | None = None) -> list[Event]:
        """The events committed after this id (of these types, of these streams' ids, when given), oldest first."""
        query = select(events).where(events.c.event_id > after)
        if types:
            query = query.where(events.c.type.in_(types))
        if streams:
            query = query.where(events.c.stream_id.in_(sorted(streams)))
        with self.read() as conn:
            return [Event.from_row(r) for r in conn.execute(query.order_by(events.c.event_id).limit(limit))]

    def stream(self, stream_type: str, stream_id: str) -> list[Event]:
        with self.read() as conn:
            rows = conn.execute(
                select(events).where(events.c.stream_type == stream_type, events.c.stream_id == stream_id)
                .order_by(events.c.seq)
            )
            return [Event.from_row(r) for r in rows]

    def all_events(self, chunk: int = 20000) -> Iterator[Event]:
        """Every event in log order, read in chunks so a long log does not sit in memory twice."""
        last = 0
        with self.read() as conn:
            while True:
                rows = conn.execute(
                    select(events).where(events.c.event_id > last).order_by(events.c.event_id).limit(chunk)
                ).all()
                if not rows:
                    return
                for row in rows:
                    yield Event.from_row(row)
                last = rows[-1].event_id

    # rebuild ---------------------------------------------------------------------------------

    def fold_log(self) -> MemoryProjection:
        projection = MemoryProjection()
        for event in self.all_events():
            reducer.apply(projection, event)
        return projection

    def rebuild(self) -> dict[str, int]:
        """Drop every projection row and replay the log; returns the rows written per table."""
        projection = self.fold_log()

        def replace(tx: Tx) -> dict[str, int]:
            counts = {}
            for name, table in PROJECTIONS.items():
                tx.conn.execute(delete(table))
                rows = list(projection.tables[name].values())
                for start in range(0, len(rows), 5000):
                    self.dialect.execute_many(tx.conn, PROJECTION_INSERTS[name], rows[start:start + 5000])
                counts[name] = len(rows)
            running = {(r["session_id"], r["step_index"]) for r in projection.tables["steps"].values()
                       if r["status"] == "running"}
            for lease in tx.conn.execute(select(leases.c.session_id, leases.c.step_index)).all():
                if (lease.session_id, lease.step_index) not in running:
                    tx.conn.execute(delete(leases).where(leases.c.session_id == lease.session_id,
                                                         leases.c.step_index == lease.step_index))
            return counts

        return self.write(replace)

    def verify(self) -> list[str]:
        """Differences between the live projections and a fresh fold of the log (empty: none)."""
        projection = self.fold_log()
        differences = []
        with self.read() as conn:
            for name, table in PROJECTIONS.items():
                keys = [c.name for c in table.primary_key.columns]
                live = {tuple(r[k] for k in keys): dict(r) for r in conn.execute(select(table)).mappings()}
                folded = projection.tables[name]
                for key in sorted(set(live) | set(folded), key=str):
                    if key not in live:
                        differences.append(f"{name} {key}: missing from the live table")
                    elif key not in folded:
                        differences.append(f"{name} {key}: in the live table but not in the log")
                    else:
                        for column, value in folded[key].items():
                            if live[key].get(column) != value:
                                differences.append(
                                    f"{name} {key}.{column}: live {live[key].get(column)!r}, log {value!r}")
        return differences


# What any store call may raise that is the database's trouble, not the caller's.
STORE_ERRORS = (StoreError,)


def is_lost_connection(exc: BaseException) -> bool:
    """Whether an error means the database cannot be reached (rather than a wrong statement)."""
    return isinstance(exc, StoreUnavailable)
