"""Replication of the broker's SQLite state to a passive broker, at the level of the Store's transactions.

Capture knows no table: at start it puts temporary triggers on every table of the state database, which
note the (table, rowid) of each row a statement writes. At commit (`Store.tx`) the final image of each noted
row, or its absence, is read back and becomes the transaction's `Record`, numbered by `lsn`. So a table or
column another part of the broker adds to `nsd.broker.store`'s schema replicates with no code here, and a
savepoint rolled back takes its notes with it (they live in a TEMP table, inside the transaction).

The passive broker applies a record in one transaction of its own (`apply_record`): deletes, then
`INSERT OR REPLACE` of each image with its rowid, into tables and columns it checks against its own
schema (the wire names them; only names its own database has are used, and every value is a bound
parameter). Its copy is the same database, row for row, rowid for rowid. A broker that joins starts from a
`snapshot` (SQLite's backup API) and then the records after it (`ReplayLog`).

Without a pair nothing here runs: no triggers, no table, no cost.
"""

from __future__ import annotations

import collections
import hashlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PAIR_TABLE = "pair_state"  # this broker's place in the pair's history; never replicated
PART_BYTES = 4 << 20  # a record larger than this travels in parts (PEER_TX), each checked on arrival

def row_bytes(row: list) -> int:
    """About a row's size on the wire (cheap: no encoding), for cutting records into parts and bounds."""
    values = row[2] or ()
    return 24 + sum(len(v) if isinstance(v, (str, bytes)) else 9 for v in values)

class ReplicationError(RuntimeError):
    """A record that cannot be applied here (a schema that differs, a gap): the passive starts over from a
    snapshot."""

@dataclass
class PairRecord:
    epoch: int  # the active term: raised by one each time a broker becomes active
    lsn: int  # the last transaction committed (active) or applied (passive) here
    copy_ok: bool  # this database holds a whole history: an active's, or a copy that had caught up

@dataclass
class Record:
    """One committed transaction: every row it left, as [table, rowid, values or None (deleted)]."""
    epoch: int
    lsn: int
    tables: dict[str, list[str]]
    rows: list[list]
    size: int = 0
    _parts: list[dict] | None = None

    def parts(self) -> list[dict]:
        """PEER_TX bodies: the rows cut into parts of about PART_BYTES."""
        if self._parts is None:
            self._parts = self._cut()
        return self._parts

    def _cut(self) -> list[dict]:
        parts, rows, size = [], [], 0
        for row in self.rows:
            n = row_bytes(row)
            if rows and size + n > PART_BYTES:
                parts.append(rows)
                rows, size = [], 0
            rows.append(row)
            size += n
        parts.append(rows)
        return [{"epoch": self.epoch, "lsn": self.lsn, "part": i, "last": i == len(parts) - 1,
                 "tables": {t: self.tables[t] for t in {r[0] for r in rows}}, "rows": rows}
                for i, rows in enumerate(parts)]

def replicated_tables(db: sqlite3.Connection) -> dict[str, list[str]]:
    """Every table of the state database but our own bookkeeping, with its columns in order."""
    names = [r[0] for r in db.execute("SELECT name FROM main.sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                      "'sqlite_%' AND name != ? ORDER BY name", (PAIR_TABLE,))]
    return {name: [r[1] for r in db.execute(f'PRAGMA main.table_info("{name}")')] for name in names}

def schema_id(tables: dict[str, list[str]]) -> str:
    """Both brokers of a pair must replicate the same tables and columns (the same nsd version); the order
    of columns may differ (a database created before a column was added has it last)."""
    return hashlib.sha256(repr(sorted((t, sorted(c)) for t, c in tables.items())).encode()).hexdigest()[:16]

# ---- this broker's place in the history ---------------------------------------------------------

def ensure_pair_table(db: sqlite3.Connection, copy_ok: bool) -> None:
    db.execute(f"CREATE TABLE IF NOT EXISTS {PAIR_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), "
               "epoch INTEGER NOT NULL, lsn INTEGER NOT NULL, copy_ok INTEGER NOT NULL)")
    db.execute(f"INSERT OR IGNORE INTO {PAIR_TABLE} (id, epoch, lsn, copy_ok) VALUES (1, 0, 0, ?)", (int(copy_ok),))
    # Replicated like any table: each term's first transaction, so every epoch begins a point of the history.
    db.execute("CREATE TABLE IF NOT EXISTS pair_terms (epoch INTEGER PRIMARY KEY, role TEXT NOT NULL, started REAL NOT NULL)")

def read_pair(db: sqlite3.Connection) -> PairRecord:
    epoch, lsn, copy_ok = db.execute(f"SELECT epoch, lsn, copy_ok FROM {PAIR_TABLE} WHERE id = 1").fetchone()
    return PairRecord(epoch, lsn, bool(copy_ok))

def write_pair(db: sqlite3.Connection, **fields) -> None:
    """Inside the caller's transaction (or autocommit): epoch, lsn and/or copy_ok."""
    sets = ", ".join(f"{name} = ?" for name in fields if name in ("epoch", "lsn", "copy_ok"))
    db.execute(f"UPDATE {PAIR_TABLE} SET {sets} WHERE id = 1", tuple(int(v) for v in fields.values()))

# ---- the active side: capture ----------------------------------------------------------------------

class Capture:
    """Turns each committed transaction of `db` into a Record, handed to `emit` after its commit.

    `Store.tx` calls `before_commit` inside the transaction (the images are read and the lsn is raised in
    the same commit), `after_commit` once it is durable, `discard` when it was rolled back."""

    def __init__(self, db: sqlite3.Connection, emit: Callable[[Record], None]):
        self.db, self.emit = db, emit
        self.tables = replicated_tables(db)
        pair = read_pair(db)
        self.epoch, self.lsn = pair.epoch, pair.lsn
        self._pending: Record | None = None

    def install(self) -> None:
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS nsd_changes (tbl TEXT NOT NULL, rid INTEGER NOT NULL)")
        for table in self.tables:
            self.db.executescript(
                f'CREATE TEMP TRIGGER IF NOT EXISTS nsd_rep_{table}_i AFTER INSERT ON main."{table}" '
                f"BEGIN INSERT INTO nsd_changes VALUES ('{table}', NEW.rowid); END;"
                f'CREATE TEMP TRIGGER IF NOT EXISTS nsd_rep_{table}_u AFTER UPDATE ON main."{table}" '
                f"BEGIN INSERT INTO nsd_changes VALUES ('{table}', NEW.rowid); END;"
                f'CREATE TEMP TRIGGER IF NOT EXISTS nsd_rep_{table}_m AFTER UPDATE ON main."{table}" '
                f"WHEN OLD.rowid != NEW.rowid BEGIN INSERT INTO nsd_changes VALUES ('{table}', OLD.rowid); END;"
                f'CREATE TEMP TRIGGER IF NOT EXISTS nsd_rep_{table}_d AFTER DELETE ON main."{table}" '
                f"BEGIN INSERT INTO nsd_changes VALUES ('{table}', OLD.rowid); END;")

    def remove(self) -> None:
        for table in self.tables:
            for kind in "iumd":
                self.db.execute(f"DROP TRIGGER IF EXISTS temp.nsd_rep_{table}_{kind}")
        self.db.execute("DROP TABLE IF EXISTS temp.nsd_changes")

    def before_commit(self) -> None:
        noted = self.db.execute("SELECT DISTINCT tbl, rid FROM temp.nsd_changes").fetchall()
        if not noted:
            return
        self.db.execute("DELETE FROM temp.nsd_changes")
        rows = []
        for table, rowid in noted:
            image = self.db.execute(f'SELECT * FROM main."{table}" WHERE rowid = ?', (rowid,)).fetchone()
            rows.append([table, rowid, None if image is None else list(image)])
        record = Record(self.epoch, self.lsn + 1, {t: self.tables[t] for t in {r[0] for r in rows}}, rows)
        record.size = sum(map(row_bytes, rows))  # what the replay log counts
        write_pair(self.db, lsn=record.lsn, epoch=self.epoch)
        self._pending = record

    def after_commit(self) -> None:
        record, self._pending = self._pending, None
        if record is not None:
            self.lsn = record.lsn
            self.emit(record)

    def discard(self) -> None:
        self._pending = None

# ---- the passive side: apply ---------------------------------------------------------------------

class Applier:
    """Writes records into the passive's database, checked against its own schema."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.tables = replicated_tables(db)
        self._upserts: dict[tuple, str] = {}

    def _upsert(self, table: str, columns: tuple[str, ...]) -> str:
        """The statement for rows of `table` in the peer's column order (names already checked to be ours)."""
        sql = self._upserts.get((table, columns))
        if sql is None:
            sql = self._upserts[(table, columns)] = (
                f'INSERT OR REPLACE INTO main."{table}" (rowid, {", ".join(chr(34) + c + chr(34) for c in columns)}) '
                f'VALUES ({", ".join("?" * (len(columns) + 1))})')
        return sql

    def check(self, body: dict) -> None:
        """One PEER_TX part against this schema: known tables, the same columns, rows of the right width."""
        for table, columns in body["tables"].items():
            if table not in self.tables or sorted(self.tables[table]) != sorted(columns):
                raise ReplicationError(f"the peer's table {table!r} is not this broker's (columns "
                                       f"{columns[:8]} against {self.tables.get(table, [])[:8]}): run the same "
                                       f"nsd version on both brokers")
        for table, _, values in body["rows"]:
            if table not in body["tables"]:
                raise ReplicationError(f"a row of table {table!r}, which the record does not describe")
            if values is not None and len(values) != len(self.tables[table]):
                raise ReplicationError(f"a row of {table!r} with {len(values)} values, not {len(self.tables[table])}")

    def apply(self, epoch: int, lsn: int, parts: list[dict]) -> None:
        """One record (its parts, each checked already) in one transaction, with the new (epoch, lsn)."""
        rows = [(row, tuple(body["tables"][row[0]])) for body in parts for row in body["rows"]]
        self.db.execute("BEGIN")
        try:
            for (table, rowid, values), _ in rows:
                if values is None:
                    self.db.execute(f'DELETE FROM main."{table}" WHERE rowid = ?', (rowid,))
            for (table, rowid, values), columns in rows:
                if values is not None:
                    self.db.execute(self._upsert(table, columns), (rowid, *values))
            write_pair(self.db, epoch=epoch, lsn=lsn)
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise ReplicationError(f"could not apply transaction {lsn}: {exc}") from None
            raise

# ---- history kept for a peer that comes back ----------------------------------------------------

class ReplayLog:
    """The latest records, bounded in bytes: a passive that was away briefly, or that just installed a
    snapshot, continues from here when its (epoch, lsn) is a point of this history."""

    def __init__(self, epoch: int, lsn: int, max_bytes: int = 64 << 20):
        self.base = (epoch, lsn)  # the point the log starts after
        self.records: collections.deque[Record] = collections.deque()
        self.max_bytes, self.bytes = max_bytes, 0

    def add(self, record: Record) -> None:
        self.records.append(record)
        self.bytes += record.size
        while self.bytes > self.max_bytes and len(self.records) > 1:
            old = self.records.popleft()
            self.bytes -= old.size
            self.base = (old.epoch, old.lsn)

    def get(self, lsn: int) -> Record | None:
        if not self.records or not self.records[0].lsn <= lsn <= self.records[-1].lsn:
            return None
        return self.records[lsn - self.records[0].lsn]

    def reset(self, epoch: int, lsn: int) -> None:
        self.records.clear()
        self.bytes, self.base = 0, (epoch, lsn)

    def after(self, epoch: int, lsn: int) -> list[Record] | None:
        """The records after the point (epoch, lsn), or None when it is not a point of this history."""
        if (epoch, lsn) == self.base:
            return list(self.records)
        for i, record in enumerate(self.records):
            if (record.epoch, record.lsn) == (epoch, lsn):
                return list(self.records)[i + 1:]
        return None

# ---- snapshots ---------------------------------------------------------------------------------------

def snapshot(db: sqlite3.Connection, path: Path) -> tuple[int, str]:
    """A consistent copy of the database (between transactions), and its (size, sha256)."""
    path.unlink(missing_ok=True)
    target = sqlite3.connect(str(path))
    try:
        db.backup(target)
    finally:
        target.close()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()

def replace_database(path: Path, incoming: Path) -> None:
    """Put a fetched snapshot in place of the (closed) database; its old WAL must not be replayed onto it."""
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(incoming, path)
