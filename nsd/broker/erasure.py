"""Erasure and retention (README "Privacy"): deleting a task removes it and everything kept about it — its
trials, logs, events, the cache entries it produced, its blobs where no other task of its tenant names
them (the files themselves once nobody owns or names them) — and tells every worker to drop those blobs
and the task's folders from its cache (`DROP`; workers that are away get it when they register again).
`retention_days` (per tenant: `tenant_retention`) deletes finished tasks the same way.

A mixin of `nsd.broker.core.Core`. Files are removed, and the WAL truncated, only after the transaction
commits (effects), so a rolled-back deletion loses nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nsd.broker.model import Task
from nsd.broker.tenancy import STORED_BY, task_blobs
from nsd.protocol import MAX_DROP, Cmd
from nsd.states import TaskState

log = logging.getLogger("nsd.broker")
DAY_S = 86400.0


@dataclass(frozen=True)
class RemoveBlob:
    """An effect: the blob's file goes after the commit."""
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    """An effect: truncate SQLite's WAL after the commit that deleted rows."""


def expired(task: Task, now: float, retention_days: float, per_tenant: dict[str, float]) -> bool:
    """Whether a finished task is past its tenant's retention (0 days: kept forever)."""
    days = per_tenant.get(task.owner, retention_days)
    return bool(days) and task.state.terminal and task.finished is not None and now - task.finished > days * DAY_S


def drop_messages(blobs: list[str], tasks: list[str]) -> list[dict]:
    """DROP bodies for these blobs and task ids, each within the protocol's bound."""
    out = []
    for i in range(0, max(len(blobs), len(tasks)), MAX_DROP):
        out.append({"sha256": blobs[i:i + MAX_DROP], "tasks": tasks[i:i + MAX_DROP]})
    return out


class Erasure:
    def delete_task(self, task: Task, why: str = "deleted by its owner") -> list[str]:
        """Remove the task and what it leaves behind (module docstring); returns the blobs workers drop."""
        with self.tx():
            if not task.state.terminal:
                self.finish(task, TaskState.CANCELLED, error=why)
            self._touch(task)  # a rollback reloads it from SQLite
            self._unindex(task)
            del self.tasks[task.id]
            self.store.delete_task(task.id)
            named = set().union(*(task_blobs(t) for t in self.tasks.values() if t.owner == task.owner))
            dropped = sorted(task_blobs(task) - named)
            still_named = set().union(*(task_blobs(t) for t in self.tasks.values())) if dropped else set()
            now = time.time()
            for sha in dropped:
                self.store.disown(sha, task.owner)
                if not [o for o in self.store.owners(sha) if not o.startswith(STORED_BY)] and sha not in still_named:
                    self.store.disown(sha)
                    self.effects.append(RemoveBlob(sha))
                self.store.add_erasure("blob", sha, now)
            self.store.add_erasure("task", task.id, now)
            for body in drop_messages(dropped, [task.id]):
                for worker in self.workers.values():
                    self.send(worker, Cmd.DROP, body)
            self.effects.append(Checkpoint())
        log.info("task %s deleted (%s): %d blob(s) dropped", task.id, why, len(dropped))
        return dropped

    def expire(self, now: float, retention_days: float, per_tenant: dict[str, float]) -> int:
        """Delete every finished task past its retention; returns how many."""
        old = [t for t in self.tasks.values() if expired(t, now, retention_days, per_tenant)]
        for task in old:
            with self.tx():
                self.audit(None, "retention", task, f"finished {(now - task.finished) / DAY_S:.1f} days ago")
                self.delete_task(task, "retention")
        return len(old)

    def adopt_legacy_owners(self, tenant_of) -> int:
        """Tasks from before tenants were owned by their client key (Z85): give each to its key's tenant."""
        moved = 0
        with self.tx():
            for task in self.tasks.values():
                name = tenant_of(task.owner) if len(task.owner) == 40 else None
                if name is not None:
                    self._unindex(task)
                    task.owner = name
                    self._index(task)
                    self._write_task(task, owner=name)
                    moved += 1
        return moved

    def drops_for(self, worker) -> None:
        """What a worker that registers must drop: every erasure the broker remembers (it may have been away)."""
        erased = self.store.erasures()
        if erased["blob"] or erased["task"]:
            for body in drop_messages(erased["blob"], erased["task"]):
                self.send(worker, Cmd.DROP, body)
