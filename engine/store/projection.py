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
UPDATE = {name: update(t).where(_by_key(t)).values({c.name: bindparam(c.name) for c in t.columns})
          for name, t in PROJECTIONS.items()}
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
    """Rows read from and written back to the database within one transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._rows: dict[tuple[str, tuple], Row | None] = {}
        self._in_db: set[tuple[str, tuple]] = set()
        self._dirty: dict[tuple[str, tuple], None] = {}
        self._loaded_parents: set[tuple[str, str]] = set()

    def seed(self, table: str, row: Row) -> None:
        """Hand over a row already read in this transaction, saving a query."""
        entry = (table, tuple(row[k] for k in KEYS[table]))
        if entry not in self._rows:
            self._rows[entry] = dict(row)
            self._in_db.add(entry)

    def get(self, table: str, key: tuple) -> Row | None:
        entry = (table, key)
        if entry not in self._rows:
            row = self.conn.execute(SELECT[table], _key_params(table, key)).mappings().first()
            self._rows[entry] = dict(row) if row else None
            if row:
                self._in_db.add(entry)
        row = self._rows[entry]
        return dict(row) if row is not None else None

    def put(self, table: str, row: Row) -> None:
        """Change a row read earlier in this transaction, or insert a new one (never read: new)."""
        entry = (table, tuple(row[k] for k in KEYS[table]))
        self._rows[entry] = dict(row)
        self._dirty[entry] = None

    def delete(self, table: str, key: tuple) -> None:
        self._rows[(table, key)] = None
        self._dirty[(table, key)] = None

    def children(self, table: str, parent_id: str) -> list[Row]:
        if (table, parent_id) not in self._loaded_parents:
            for row in self.conn.execute(CHILDREN[table], {"parent": parent_id}).mappings():
                self.seed(table, row)
            self._loaded_parents.add((table, parent_id))
        found = [
            dict(row) for (name, key), row in self._rows.items()
            if name == table and row is not None and row[PARENT[table]] == parent_id
        ]
        return sorted(found, key=lambda r: tuple(r[k] for k in KEYS[table]))

    def flush(self) -> None:
        """Write the changed rows: inserts, updates and deletes, grouped per table."""
        inserts: dict[str, list[Row]] = defaultdict(list)
        updates: dict[str, list[Row]] = defaultdict(list)
        for entry in self._dirty:
            table, key = entry
            row = self._rows[entry]
            if row is None:
                if entry in self._in_db:
                    self.conn.execute(DELETE[table], _key_params(table, key))
                    self._in_db.discard(entry)
            elif entry in self._in_db:
                updates[table].append({**row, **_key_params(table, key)})
            else:
                inserts[table].append(row)
                self._in_db.add(entry)
        for table, rows in updates.items():
            self.conn.execute(UPDATE[table], rows)
        for table, rows in inserts.items():
            self.conn.execute(INSERT[table], rows)
        self._dirty.clear()
