"""SQLite persistence for the broker: tasks, trials, logs, worker keys, the metric cache, who owns which
blob, the audit log and what workers must erase; write-through, WAL.

Column names come from this module's own constants, never from a peer; values are always bound
parameters. JSON columns hold plain data (spec, config, error details). Deleted rows are overwritten
(`secure_delete`), and an erasure truncates the WAL (`checkpoint`), so a deleted task's rows leave no
copy in the database files (README "Privacy").
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    baseline REAL,
    winner INTEGER,
    met_goal INTEGER,
    error TEXT,
    seq INTEGER NOT NULL DEFAULT 0,
    stage_attempt INTEGER NOT NULL DEFAULT 1,
    stage_worker TEXT,
    plan_s REAL,
    artifact TEXT,
    owner TEXT NOT NULL DEFAULT '',
    oplists TEXT  -- the plan's ops and blocks per config family (JSON), for the fallback search
);
CREATE TABLE IF NOT EXISTS trials (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    idx INTEGER NOT NULL,
    config TEXT NOT NULL,
    label TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    metric REAL,
    worker TEXT,
    started REAL,
    finished REAL,
    seconds REAL,
    error TEXT,
    stage TEXT NOT NULL DEFAULT 'config',  -- the fallback search's stage (nsd/broker/search.py)
    fallback TEXT NOT NULL DEFAULT '[]',  -- op names kept in FP32 (JSON list)
    base INTEGER,  -- the config trial a fallback trial builds on
    PRIMARY KEY (task_id, idx)
);
CREATE TABLE IF NOT EXISTS logs (
    task_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT,
    text TEXT NOT NULL,
    PRIMARY KEY (task_id, job, attempt)
);
CREATE TABLE IF NOT EXISTS worker_keys (
    worker_id TEXT PRIMARY KEY,
    key TEXT NOT NULL  -- the CURVE public key (z85) that first registered this worker id
);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,  -- nsd.broker.metric_cache: content-addressed plans, trial metrics, artifacts
    body TEXT NOT NULL,
    created REAL NOT NULL
);
DROP TABLE IF EXISTS events;  -- events were kept here until 2026-12 and never read: clients re-snapshot
CREATE TABLE IF NOT EXISTS blob_owners (
    sha256 TEXT NOT NULL,
    owner TEXT NOT NULL,  -- a tenant that uploaded these bytes or whose artifact they are; `worker:ID` that stored them
    created REAL NOT NULL,
    PRIMARY KEY (sha256, owner)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    tenant TEXT NOT NULL,  -- whose task (or blob) it was done to
    actor TEXT NOT NULL,  -- the key (and the tenant a gateway acted for): nsd.tenants.Acting.actor
    action TEXT NOT NULL,
    task_id TEXT,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS erasures (
    kind TEXT NOT NULL,  -- blob | task: what every worker must drop from its cache
    name TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
"""

class StorageError(RuntimeError):
    """SQLite could not commit (disk full, read-only, I/O error): nothing of the transaction was kept."""


def storage_message(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "full" in text:
        return f"broker storage is full: {text}"
    if "readonly" in text or "read-only" in text:
        return f"broker storage is read-only: {text}"
    return f"broker storage failed: {text}"


MIGRATIONS = (  # columns added after the first release: (table, column, definition)
    ("tasks", "owner", "TEXT NOT NULL DEFAULT ''"),
    # the fallback search: rows from before it are config-set trials with no fallback
    ("tasks", "oplists", "TEXT"), ("trials", "stage", "TEXT NOT NULL DEFAULT 'config'"),
    ("trials", "fallback", "TEXT NOT NULL DEFAULT '[]'"), ("trials", "base", "INTEGER"),
    ("trials", "bound", "REAL"),  # early stop: the best metric a stopped trial could still have reached
    ("trials", "stopped_early", "INTEGER"),
    ("trials", "cached", "INTEGER"),  # answered from the metric cache
    # job kinds (nsd.broker.jobs): the leases of the jobs other than trials, [[kind, index, attempt, worker]]
    ("tasks", "jobs", "TEXT"),
    # deployment figures (nsd/figures.py), each [figures, the hardware they were measured on] (JSON)
    ("tasks", "baseline_figures", "TEXT"), ("trials", "figures", "TEXT"),
    ("trials", "pruned", "INTEGER"),  # not evaluated: its figures lost to a passing trial's
    ("tasks", "submit_id", "TEXT"),  # the client's id for one submission: a SUBMIT retried after a failover
    # the metric cache per tenant (README "Privacy"): whose entry, and which task and worker produced it
    ("cache", "scope", "TEXT NOT NULL DEFAULT ''"), ("cache", "task_id", "TEXT"), ("cache", "worker", "TEXT"),
    ("tasks", "candidate", "TEXT"),  # the saved winner while it is verified (nsd.broker.verification)
    # lazy exactness: a stopped trial's interval, and its refine job's outcome ("done", "failed")
    ("trials", "low", "REAL"), ("trials", "high", "REAL"), ("trials", "refine", "TEXT"),
    ("tasks", "baseline_s", "REAL"),  # the baseline job's seconds (it runs beside the trials)
)
INDEXES = ("CREATE INDEX IF NOT EXISTS cache_by_task ON cache (task_id)",
           "CREATE INDEX IF NOT EXISTS cache_by_worker ON cache (worker)",
           "CREATE INDEX IF NOT EXISTS audit_by_task ON audit (task_id)")
AUDIT_KEPT = 100_000  # the newest audit entries kept (README "Privacy": bounded)
ERASURES_KEPT = 10_000  # erasures remembered for workers that were away when they happened
TASK_COLUMNS = frozenset({"state", "started", "finished", "baseline", "winner", "met_goal", "error", "seq",
                          "stage_attempt", "stage_worker", "plan_s", "artifact", "oplists", "baseline_figures", "jobs",
                          "owner", "candidate", "baseline_s"})
TRIAL_COLUMNS = frozenset({"state", "attempt", "metric", "worker", "started", "finished", "seconds", "error",
                           "bound", "stopped_early", "cached", "figures", "pruned", "low", "high", "refine"})


class Store:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None)  # explicit BEGIN/COMMIT below
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self.db.execute("PRAGMA secure_delete=ON")  # a deleted row's bytes are overwritten, not left in free pages
        self.db.executescript(SCHEMA)
        for table, column, definition in MIGRATIONS:
            if column not in {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                if (table, column) == ("cache", "scope"):  # entries from before tenants: whose they were,
                    self.db.execute("DELETE FROM cache")   # and which worker made them, is not known
        self.db.execute("CREATE INDEX IF NOT EXISTS tasks_submit_id ON tasks (owner, submit_id) WHERE submit_id IS NOT NULL")
        for index in INDEXES:
            self.db.execute(index)
        self._depth = 0
        self._audits = 0
        # A broker pair's replication (nsd.broker.replication.Capture): each commit becomes a record.
        self.capture = None

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """One transaction; a nested use is a savepoint inside it, rolled back alone if its block raises.
        sqlite3.Error (disk full, read-only, I/O error) propagates after the rollback."""
        if self._depth:
            name = f"sp{self._depth}"
            self.db.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self.db.execute(f"ROLLBACK TO {name}")
                self.db.execute(f"RELEASE {name}")
                raise
            else:
                self.db.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN")
        self._depth = 1
        try:
            yield
            if self.capture is not None:
                self.capture.before_commit()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if self.capture is not None:
                self.capture.discard()
            raise
        finally:
            self._depth = 0
        if self.capture is not None:  # durable now: its record goes to the passive broker
            self.capture.after_commit()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The statements of one method: inside a caller's transaction they are part of it (a savepoint
        of their own would cost two statements more and change nothing: the caller's savepoint undoes
        the caller's whole block); outside any, a transaction of their own."""
        if self._depth:
            yield
        else:
            with self.tx():
                yield

    def insert_task(self, task_id: str, name: str, spec: dict, state: str, created: float, owner: str = "",
                    submit_id: str | None = None) -> None:
        with self._writing():
            self.db.execute("INSERT INTO tasks (id, name, spec, state, created, owner, submit_id) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", (task_id, name, json.dumps(spec), state, created, owner,
                                                             submit_id))

    def submitted(self, owner: str, submit_id: str) -> str | None:
        """The task an earlier SUBMIT with this id created for this owner, if any."""
        row = self.db.execute("SELECT id FROM tasks WHERE owner = ? AND submit_id = ?", (owner, submit_id)).fetchone()
        return None if row is None else row["id"]

    def update_task(self, task_id: str, **fields: Any) -> None:
        self._update("tasks", TASK_COLUMNS, "id = ?", (task_id,), fields)

    def insert_trials(self, task_id: str, trials: list[tuple]) -> None:
        """Rows of (idx, config, label, state, stage, fallback, base)."""
        with self._writing():
            self.db.executemany(
                "INSERT INTO trials (task_id, idx, config, label, state, stage, fallback, base) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(task_id, idx, json.dumps(config), label, state, stage, json.dumps(fallback), base)
                 for idx, config, label, state, stage, fallback, base in trials])

    def update_trial(self, task_id: str, idx: int, **fields: Any) -> None:
        self._update("trials", TRIAL_COLUMNS, "task_id = ? AND idx = ?", (task_id, idx), fields)

    def set_seq(self, task_id: str, seq: int) -> None:
        """The task's latest event number: a client's snapshot carries it, and events continue from it."""
        with self._writing():
            self.db.execute("UPDATE tasks SET seq = ? WHERE id = ?", (seq, task_id))

    def put_log(self, task_id: str, job: str, attempt: int, worker: str | None, text: str) -> None:
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO logs (task_id, job, attempt, worker, text) VALUES (?, ?, ?, ?, ?)",
                            (task_id, job, attempt, worker, text))

    def logs(self, task_id: str, job: str | None = None) -> list[dict]:
        rows = self.db.execute("SELECT job, attempt, worker, text FROM logs WHERE task_id = ? AND (? IS NULL OR job = ?)"
                               " ORDER BY rowid", (task_id, job, job))
        return [dict(r) for r in rows]

    def tasks(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM tasks ORDER BY created, id").fetchall()

    def task(self, task_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()

    def worker_key(self, worker_id: str) -> str | None:
        row = self.db.execute("SELECT key FROM worker_keys WHERE worker_id = ?", (worker_id,)).fetchone()
        return None if row is None else row["key"]

    def bind_worker_key(self, worker_id: str, key: str) -> None:
        with self._writing():
            self.db.execute("INSERT OR IGNORE INTO worker_keys (worker_id, key) VALUES (?, ?)", (worker_id, key))

    def referenced_blobs(self) -> set[str]:
        """Blob hashes any task names (its spec's files, its artifact): what the blob store must keep."""
        refs = set()
        for row in self.db.execute("SELECT spec, artifact FROM tasks"):
            refs.update(re.findall(r"nsd-blob:([0-9a-f]{64})/", row["spec"]))
            if row["artifact"]:
                refs.update(re.findall(r"nsd-blob:([0-9a-f]{64})/", row["artifact"]))
        return refs

    def check(self) -> None:
        """Raise sqlite3.Error if the database cannot be read (a cheap health check for the watchdog)."""
        self.db.execute("SELECT 1 FROM tasks LIMIT 1").fetchall()

    def cache_get(self, key: str) -> dict | None:
        """A cached answer (nsd.broker.metric_cache), or None."""
        row = self.db.execute("SELECT body FROM cache WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row["body"])

    def cache_put(self, key: str, body: dict, created: float, scope: str = "", task_id: str | None = None,
                  worker: str | None = None) -> None:
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO cache (key, body, created, scope, task_id, worker) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (key, json.dumps(body), created, scope, task_id, worker))

    def cache_purge(self, task_id: str | None = None, worker: str | None = None, scope: str | None = None,
                    key: str | None = None) -> int:
        """Delete cache entries matching every given filter (none given: all of them); returns how many."""
        where = " AND ".join(f"{column} = ?" for column, value in (("task_id", task_id), ("worker", worker),
                                                                    ("scope", scope), ("key", key))
                             if value is not None) or "1"
        values = tuple(v for v in (task_id, worker, scope, key) if v is not None)
        with self._writing():
            return self.db.execute(f"DELETE FROM cache WHERE {where}", values).rowcount

    # ---- tenants: blob owners, the audit log, erasure (README "Privacy") ------------------------------

    def add_owner(self, sha256: str, owner: str, created: float) -> None:
        with self._writing():
            self.db.execute("INSERT OR IGNORE INTO blob_owners (sha256, owner, created) VALUES (?, ?, ?)",
                            (sha256, owner, created))

    def owns(self, sha256: str, owner: str) -> bool:
        return self.db.execute("SELECT 1 FROM blob_owners WHERE sha256 = ? AND owner = ?",
                               (sha256, owner)).fetchone() is not None

    def owners(self, sha256: str) -> list[str]:
        return [r["owner"] for r in self.db.execute("SELECT owner FROM blob_owners WHERE sha256 = ?", (sha256,))]

    def disown(self, sha256: str, owner: str | None = None) -> None:
        """Drop one owner of a blob (None: every owner)."""
        with self._writing():
            self.db.execute("DELETE FROM blob_owners WHERE sha256 = ? AND (? IS NULL OR owner = ?)",
                            (sha256, owner, owner))

    def delete_task(self, task_id: str) -> None:
        """A task and everything kept about it: trials, logs, the cache entries it produced."""
        with self._writing():
            for table in ("trials", "logs", "cache"):
                self.db.execute(f"DELETE FROM {table} WHERE task_id = ?", (task_id,))
            self.db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: a deleted row's old pages leave the WAL file.
        Outside a transaction only (after the commit that deleted them)."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def add_erasure(self, kind: str, name: str, created: float) -> None:
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO erasures (kind, name, created) VALUES (?, ?, ?)",
                            (kind, name, created))
            self.db.execute("DELETE FROM erasures WHERE created < (SELECT created FROM erasures ORDER BY created "
                            "DESC LIMIT 1 OFFSET ?)", (ERASURES_KEPT,))

    def erasures(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"blob": [], "task": []}
        for row in self.db.execute("SELECT kind, name FROM erasures ORDER BY created"):
            out.setdefault(row["kind"], []).append(row["name"])
        return out

    def audit(self, ts: float, tenant: str, actor: str, action: str, task_id: str | None = None,
              detail: str | None = None) -> None:
        with self._writing():
            self.db.execute("INSERT INTO audit (ts, tenant, actor, action, task_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
                            (ts, tenant, actor, action, task_id, detail))
            self._audits += 1
            if self._audits % 1000 == 0:  # bounded: the newest AUDIT_KEPT entries
                self.db.execute("DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?", (AUDIT_KEPT,))

    def audit_log(self, tenant: str | None = None, task_id: str | None = None, before: int | None = None,
                  limit: int = 100) -> list[dict]:
        """The newest entries first, filtered by tenant and task; `before`: entries older than that id."""
        rows = self.db.execute(
            "SELECT id, ts, tenant, actor, action, task_id, detail FROM audit WHERE (? IS NULL OR tenant = ?) "
            "AND (? IS NULL OR task_id = ?) AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
            (tenant, tenant, task_id, task_id, before, before, limit))
        return [dict(r) for r in rows]

    def trials(self, task_id: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM trials WHERE task_id = ? ORDER BY idx", (task_id,)).fetchall()

    def _update(self, table: str, allowed: frozenset[str], where: str, key: tuple, fields: dict) -> None:
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"not a column of {table}: {sorted(bad)}")
        if not fields:
            return
        sets = ", ".join(f"{name} = ?" for name in fields)
        values = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
        with self._writing():
            self.db.execute(f"UPDATE {table} SET {sets} WHERE {where}", (*values, *key))
