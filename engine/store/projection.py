"""Where the reducer's rows live: in memory (rebuild, verify) or in the database (live writes).

`DatabaseProjection` loads rows lazily inside the writing transaction (locking them FOR UPDATE on
PostgreSQL), lets the reducer change them in memory, and writes back only what changed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection

from engine.store.tables import PROJECTIONS

Row = dict[str, Any]
KEYS = {name: [c.name for c in table.primary_key.columns] for name, table in PROJECTIONS.items()}
PARENT = {"steps": "session_id", "items": "batch_id"}


def _by_key(table) -> Any:
    return and_(*[table.c[k] == bindparam(f"key_{k}") for k in KEYS[table.name]])


# Statements built once, with bound parameters: SQLAlchemy compiles each a single time.
SELECT = {name: select(t).where(_by_key(t)).with_for_update() for name, t in PROJECTIONS.items()}
CHILDREN = {name: select(PROJECTIONS[name]).where(PROJECTIONS[name].c[parent] == bindparam("parent")).with_for_update()
            for name, parent in PARENT.items()}
DELETE = {name: delete(t).where(_by_key(t)) for name, t in PROJECTIONS.items()}
INSERT = {name: insert(t) for name, t in PROJECTIONS.items()}


def _key_params(table: str, key: tuple) -> dict[str, Any]:
    return {f"key_{k}": v for k, v in zip(KEYS[table], key)}


class MemoryProjection:
    """All rows in dicts: what `rebuild` folds the whole log into."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[tuple, Row]] = {name: {} for name in PROJECTIONS}
        self._by_parent: dict[str, dict[str, dict[tuple, Row]]] = {t: defaultdict(dict) for t in PARENT}

    def get(self, table: str, key: tuple) -> Row | None:
        return self.tables[table].get(key)

    def put(self, table: str, row: Row) -> None:
        key = tuple(row[k] for k in KEYS[table])
        self.tables[table][key] = row
        if table in PARENT:
            self._by_parent[table][row[PARENT[table]]][key] = row

    def delete(self, table: str, key: tuple) -> None:
        row = self.tables[table].pop(key, None)
        if row is not None and table in PARENT:
            self._by_parent[table][row[PARENT[table]]].pop(key, None)

    def children(self, table: str, parent_id: str) -> list[Row]:
        return sorted(self._by_parent[table].get(parent_id, {}).values(), key=lambda r: tuple(r[k] for k in KEYS[table]))


class DatabaseProjection:
    """Rows read from and written back to the database within one transaction.

    Only the columns that changed are written: an UPDATE naming every column would rewrite every
    index of the table, and each step would cost many more pages in the write-ahead log."""

    def __init__(self, conn: Connection, dialect) -> None:
        self.conn = conn
        self.dialect = dialect
        self._rows: dict[tuple[str, tuple], Row | None] = {}
        self._stored: dict[tuple[str, tuple], Row] = {}  # rows as the database holds them now
        self._dirty: dict[tuple[str, tuple], None] = {}
        self._loaded_parents: set[tuple[str, str]] = set()

    def seed(self, table: str, row: Row) -> None:
        """Hand over a row already read in this transaction, saving a query."""
        entry = (table, tuple(row[k] for k in KEYS[table]))
        if entry not in self._rows:
            self._rows[entry] = dict(row)
            self._stored[entry] = dict(row)

    def get(self, table: str, key: tuple) -> Row | None:
        entry = (table, key)
        if entry not in self._rows:
            row = self.dialect.fetch_one(self.conn, SELECT[table], _key_params(table, key))
            self._rows[entry] = row
            if row is not None:
                self._stored[entry] = dict(row)
        row = self._rows[entry]
        return dict(row) if row is not None else None

    def put(self, table: str, row: Row) -> None:
        """Change a row read earlier in this transaction, or insert a new one (never read: new).
        The row is taken as it is: the reducer hands over fresh dicts and never touches them again."""
        entry = (table, tuple(row[k] for k in KEYS[table]))
        self._rows[entry] = row
        self._dirty[entry] = None

    def delete(self, table: str, key: tuple) -> None:
        self._rows[(table, key)] = None
        self._dirty[(table, key)] = None

    def children(self, table: str, parent_id: str) -> list[Row]:
        if (table, parent_id) not in self._loaded_parents:
            for row in self.dialect.fetch_all(self.conn, CHILDREN[table], {"parent": parent_id}):
                self.seed(table, row)
            self._loaded_parents.add((table, parent_id))
        found = [
            dict(row) for (name, key), row in self._rows.items()
            if name == table and row is not None and row[PARENT[table]] == parent_id
        ]
        return sorted(found, key=lambda r: tuple(r[k] for k in KEYS[table]))

    def flush(self) -> None:
        """Write the changed rows: inserts, updates of the changed columns, deletes; grouped per table."""
        inserts: dict[str, list[Row]] = defaultdict(list)
        updates: dict[tuple[str, tuple[str, ...]], list[Row]] = defaultdict(list)
        for entry in self._dirty:
            table, key = entry
            row, stored = self._rows[entry], self._stored.get(entry)
            if row is None:
                if stored is not None:
                    self.dialect.execute(self.conn, DELETE[table], _key_params(table, key))
                    del self._stored[entry]
            elif stored is not None:
                changed = tuple(column for column, value in row.items() if stored[column] != value)
                if changed:
                    updates[(table, changed)].append({**{c: row[c] for c in changed}, **_key_params(table, key)})
                    self._stored[entry] = row
            else:
                inserts[table].append(row)
                self._stored[entry] = row
        for (table, columns), rows in updates.items():
            self.dialect.execute_many(self.conn, _update(table, columns), rows)
        for table, rows in inserts.items():
            self.dialect.execute_many(self.conn, INSERT[table], rows)
        self._dirty.clear()


_UPDATES: dict[tuple[str, tuple[str, ...]], Any] = {}


def _update(table: str, columns: tuple[str, ...]):
    """UPDATE of these columns by primary key, built once per set of columns."""
    statement = _UPDATES.get((table, columns))
    if statement is None:
        t = PROJECTIONS[table]
        statement = update(t).where(_by_key(t)).values({c: bindparam(c) for c in columns})
        _UPDATES[(table, columns)] = statement
    return statement
