"""Each tenant sees only its own (README "Privacy"): which tasks and blobs a request may name, which event
subscriptions the XPUB socket grants, which blobs a worker may fetch or store, and the audit log.

A mixin of `nsd.broker.core.Core` (it uses Core's tasks, store and transactions). A task or blob that is
not the asking tenant's gets exactly the answer an unknown one gets — the same words, for full ids and for
id prefixes alike — so no answer tells one tenant what another holds.
"""

from __future__ import annotations

import time
from typing import Iterator

from nsd.blobs import parse_ref
from nsd.broker.jobs import SAVE
from nsd.broker.model import Task, Worker
from nsd.protocol import TASK_ID, parse_job_id
from nsd.spec import spec_blob_refs
from nsd.tenants import Acting, Principal

STORED_BY = "worker:"  # a blob_owners entry `worker:ID`: that worker stored these bytes (an artifact it saved)


def no_task(task_id: str) -> LookupError:
    return LookupError(f"no task {task_id[:64]!r}")


def no_blob(sha256: str) -> LookupError:
    return LookupError(f"no blob {sha256[:12]}…")


def task_blobs(task: Task) -> set[str]:
    """The blob hashes a task names: its spec's files and its artifact (or the saved winner being verified)."""
    shas = {parse_ref(ref)[0] for ref in spec_blob_refs(task.spec)}
    for ref in (task.artifact, task.candidate):
        if parse_ref(ref) is not None:
            shas.add(parse_ref(ref)[0])
    return shas


class Tenancy:
    auditing = True  # off while the daemon answers reads again after a failed commit (a full disk)

    # ---- tasks -------------------------------------------------------------------------------------

    def visible(self, acting: Acting) -> Iterator[Task]:
        return (t for t in self.tasks.values() if acting.sees(t.owner))

    def find_for(self, acting: Acting, task_id: str) -> Task:
        """The task `task_id` (or a unique prefix of 4+ characters) names among those `acting` may see."""
        task = self.tasks.get(task_id)
        if task is not None:
            if acting.sees(task.owner):
                return task
            raise no_task(task_id)
        matches = [t.id for t in self.visible(acting) if t.id.startswith(task_id)] if len(task_id) >= 4 else []
        if len(matches) != 1:
            raise no_task(task_id) if not matches else LookupError(f"task id {task_id!r} is ambiguous")
        return self.tasks[matches[0]]

    # ---- blobs -------------------------------------------------------------------------------------

    def owns_blob(self, acting: Acting, sha256: str) -> bool:
        """Whether a request may use these bytes: its tenant uploaded them or holds them as an artifact
        (an admin, or the one tenant of a broker without CURVE: any stored blob)."""
        if not self.blobs.has(sha256):
            return False
        return acting.sees_all or self.store.owns(sha256, acting.tenant)

    def add_owner(self, sha256: str, owner: str) -> None:
        self.store.add_owner(sha256, owner, time.time())

    def unowned_refs(self, acting: Acting, spec: dict) -> list[str]:
        """The blob references of a spec its tenant may not name (never uploaded by it, or not stored)."""
        return [ref for ref in spec_blob_refs(spec) if not self.owns_blob(acting, parse_ref(ref)[0])]

    # ---- events ------------------------------------------------------------------------------------

    def may_subscribe(self, who: Principal, topic: bytes) -> bool:
        """An XPUB subscription: only to one whole task id its key may see. A gateway may subscribe to any
        task (it asks STATUS for its user's tenant first, and is trusted to act for tenants)."""
        try:
            task_id = topic.decode("ascii")
        except UnicodeDecodeError:
            return False
        task = self.tasks.get(task_id) if TASK_ID.fullmatch(task_id) else None
        return task is not None and (who.sees_all or who.role == "gateway" or task.owner == who.name)

    # ---- workers -----------------------------------------------------------------------------------

    def fetchable(self, worker: Worker, sha256: str) -> bool:
        """A worker may FETCH only the blobs of the jobs it holds now (issue 15)."""
        for jid in worker.running:
            task = self.tasks.get(parse_job_id(jid)[0])
            if task is not None and sha256 in task_blobs(task):
                return True
        return False

    def may_store(self, worker: Worker) -> bool:
        """A worker may STORE (upload an artifact) only while it holds a save job."""
        return any(parse_job_id(jid)[1].kind == SAVE.name for jid in worker.running)

    def stored_by(self, worker: Worker, sha256: str) -> bool:
        return self.store.owns(sha256, STORED_BY + worker.id)

    # ---- audit ---------------------------------------------------------------------------------------

    def audit(self, acting: Acting | None, action: str, task: Task | None = None, detail: str | None = None,
              tenant: str | None = None) -> None:
        """One entry of the audit log (README "Privacy"): who did what to which task; inside a transaction."""
        if not self.auditing:
            return
        owner = tenant if tenant is not None else task.owner if task is not None else acting.tenant
        self.store.audit(time.time(), owner, acting.actor if acting is not None else "broker", action,
                         task.id if task is not None else None, detail)
