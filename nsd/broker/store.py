"""SQLite persistence for the broker: tasks, trials and events, write-through, WAL.

Column names come from this module's own constants, never from a peer; values are always bound
parameters. JSON columns hold plain data (spec, config, error details).
"""

from __future__ import annotations

import contextlib
import json
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
    artifact TEXT
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
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
);
"""

TASK_COLUMNS = frozenset({"state", "started", "finished", "baseline", "winner", "met_goal", "error", "seq",
                          "stage_attempt", "stage_worker", "plan_s", "artifact"})
TRIAL_COLUMNS = frozenset({"state", "attempt", "metric", "worker", "started", "finished", "seconds", "error"})


class Store:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None)  # explicit BEGIN/COMMIT below
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self.db.executescript(SCHEMA)
        self._depth = 0

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """One transaction; nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    def insert_task(self, task_id: str, name: str, spec: dict, state: str, created: float) -> None:
        with self.tx():
            self.db.execute("INSERT INTO tasks (id, name, spec, state, created) VALUES (?, ?, ?, ?, ?)",
                            (task_id, name, json.dumps(spec), state, created))

    def update_task(self, task_id: str, **fields: Any) -> None:
        self._update("tasks", TASK_COLUMNS, "id = ?", (task_id,), fields)

    def insert_trials(self, task_id: str, trials: list[tuple[int, dict, str, str]]) -> None:
        with self.tx():
            self.db.executemany(
                "INSERT INTO trials (task_id, idx, config, label, state) VALUES (?, ?, ?, ?, ?)",
                [(task_id, idx, json.dumps(config), label, state) for idx, config, label, state in trials])

    def update_trial(self, task_id: str, idx: int, **fields: Any) -> None:
        self._update("trials", TRIAL_COLUMNS, "task_id = ? AND idx = ?", (task_id, idx), fields)

    def append_event(self, task_id: str, seq: int, body: dict) -> None:
        with self.tx():
            self.db.execute("INSERT INTO events (task_id, seq, body) VALUES (?, ?, ?)",
                            (task_id, seq, json.dumps(body)))
            self.db.execute("UPDATE tasks SET seq = ? WHERE id = ?", (seq, task_id))

    def put_log(self, task_id: str, job: str, attempt: int, worker: str | None, text: str) -> None:
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO logs (task_id, job, attempt, worker, text) VALUES (?, ?, ?, ?, ?)",
                            (task_id, job, attempt, worker, text))

    def logs(self, task_id: str, job: str | None = None) -> list[dict]:
        rows = self.db.execute("SELECT job, attempt, worker, text FROM logs WHERE task_id = ? AND (? IS NULL OR job = ?)"
                               " ORDER BY rowid", (task_id, job, job))
        return [dict(r) for r in rows]

    def tasks(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM tasks ORDER BY created, id").fetchall()

    def trials(self, task_id: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM trials WHERE task_id = ? ORDER BY idx", (task_id,)).fetchall()

    def events(self, task_id: str, after_seq: int = 0) -> list[dict]:
        rows = self.db.execute("SELECT body FROM events WHERE task_id = ? AND seq > ? ORDER BY seq",
                               (task_id, after_seq))
        return [json.loads(r["body"]) for r in rows]

    def _update(self, table: str, allowed: frozenset[str], where: str, key: tuple, fields: dict) -> None:
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"not a column of {table}: {sorted(bad)}")
        if not fields:
            return
        sets = ", ".join(f"{name} = ?" for name in fields)
        values = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
        with self.tx():
            self.db.execute(f"UPDATE {table} SET {sets} WHERE {where}", (*values, *key))
