"""The broker's state machine: tasks, workers and leases, applied to SQLite, with no sockets.

`Core` takes checked messages (from `nsd.broker.daemon`) and turns them into state changes and *effects*:
messages to workers and events for subscribers. Effects wait in `Core.effects` until the transaction that
caused them commits; the daemon sends them then. A transaction that fails (a bug in a handler, or a full,
read-only or broken disk) is rolled back in SQLite and in memory alike: the tasks it touched are reloaded
from the database and the leases rebuilt from them, and its effects are dropped. So memory never holds a
state SQLite does not, no event announces what was not committed, and no result is acknowledged before
its commit.

Decisions are delegated to the task's objective, `tuner` and `search` (who won, what to cancel, requeue
or give up, which stage comes next) and `scheduler` (which job goes where). What a job's result does to
its task — and the lost leases, cancellations and endings that follow — is `nsd.broker.outcomes.Outcomes`,
the plan's and the baseline's `nsd.broker.planning.Planning`, placing waiting jobs on free cores is
`nsd.broker.placement.Placement`, what each tenant may see is `nsd.broker.tenancy.Tenancy` and deleting tasks
`nsd.broker.erasure.Erasure`; `Core` inherits them; each job kind's handlers there are named by its row in
`nsd.broker.jobs`. This module holds the rest:
transactions, loading, workers and leases, timers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from nsd.broker import search
from nsd.broker.erasure import Erasure
from nsd.broker.limits import BrokerLimits
from nsd.broker.metric_cache import MetricCache
from nsd.broker.metrics import Metrics
from nsd.broker.jobs import PLAN
from nsd.broker.model import Lease, Task, Trial, Worker
from nsd.broker.outcomes import Outcomes
from nsd.broker.placement import Placement
from nsd.broker.planning import Planning
from nsd.broker.store import StorageError, Store, storage_message
from nsd.broker.tenancy import Tenancy
from nsd.broker.verification import Verification
from nsd.liveness import heartbeat_due
from nsd.protocol import PROTOCOL_VERSION, Cmd, JobRef, parse_job_id
from nsd.spec import TaskSpec
from nsd.states import TaskState, TrialState

log = logging.getLogger("nsd.broker")

@dataclass(frozen=True)
class ToWorker:
    identity: bytes
    cmd: Cmd
    body: dict


@dataclass(frozen=True)
class Event:
    task_id: str
    body: dict


def stored_spec(text: str) -> TaskSpec:
    """A task's spec as the store holds it (validated at submit), back as a TaskSpec."""
    data = json.loads(text)
    data.setdefault("tuning", {}).setdefault("strategy", "list")  # tasks from before the fallback search
    return TaskSpec.from_dict(data)


class Core(Outcomes, Planning, Placement, Tenancy, Erasure, Verification):
    def __init__(self, store: Store, metrics: Metrics, heartbeat_s: float, liveness: int, blobs,
                 limits: BrokerLimits | None = None, curve: bool = False, share_cache: bool = False):
        self.store, self.metrics, self.blobs = store, metrics, blobs
        self.heartbeat_s, self.liveness = heartbeat_s, liveness
        self.limits = limits or BrokerLimits()
        self.curve = curve
        # Whether a worker's key is allowed with --trusted (the daemon's CurveServer says); without CURVE,
        # every worker is the operator's own.
        self.trusted_worker = lambda key: not curve
        self.tasks: dict[str, Task] = {}
        self.queued: dict[int, dict[str, Task]] = {}  # priority -> queued tasks, oldest first
        self.started: dict[str, Task] = {}  # planning, tuning, finalizing: what scheduling walks
        self.owners: Counter[str] = Counter()  # unfinished tasks per tenant
        self.workers: dict[str, Worker] = {}
        self.free: dict[str, Worker] = {}  # workers with free cores (the placement index)
        self.orphans: dict[str, float] = {}  # job id -> since when its lease's worker is not registered
        self.effects: list[ToWorker | Event] = []
        self.ignored_results = 0  # results not from the lease holder: counted, acknowledged, dropped
        self._touched: set[str] | None = None  # task ids written in the open transaction
        self._dirty = True  # demand or free cores changed since the last scheduling pass
        self.cache = MetricCache(store, time.time, share=share_cache)
        self._answered_from_cache = False  # set by _assign when the cache answered a job (see schedule)
        self._cache_rounds = 0

    # ---- transactions ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """One unit of change. Nested: a savepoint whose failure undoes only its own block. A failure
        rolls back SQLite, reloads what it touched into memory and drops its effects; a storage failure
        is raised as StorageError."""
        outer = self._touched is None
        if outer:
            self._touched = set()
        mark = len(self.effects)
        try:
            with self.store.tx():
                yield
        except BaseException as exc:
            del self.effects[mark:]
            self._restore(self._touched)
            if outer:
                self._touched = None
            if isinstance(exc, sqlite3.Error):
                raise StorageError(storage_message(exc)) from exc
            raise
        if outer:
            self._touched = None

    def _restore(self, task_ids: set[str]) -> None:
        """Memory back to what SQLite holds for these tasks, and every lease rebuilt from the tasks."""
        for task_id in task_ids:
            old = self.tasks.get(task_id)
            row = self.store.task(task_id)
            if old is not None:
                self._unindex(old)
            if row is None:
                self.tasks.pop(task_id, None)
            else:
                self._adopt(self._task_from_row(row))
        for worker in self.workers.values():
            worker.running.clear(), worker.cores_of.clear()
            worker.cores_used = 0
        now = time.time()
        for task in self.started.values():
            for jid, attempt, wid in task.leases():
                worker = self.workers.get(wid)
                if worker is not None:
                    worker.take(jid, attempt, self.job_cores(task, worker))
                else:
                    self.orphans.setdefault(jid, now)
        self.free = {w.id: w for w in self.workers.values() if w.free_cores > 0}

    def _touch(self, task: Task) -> None:
        if self._touched is not None:
            self._touched.add(task.id)

    # ---- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        """State after a restart. Leases reloaded from disk wait one grace window for their workers."""
        now = time.time()
        for row in self.store.tasks():
            task = self._task_from_row(row)
            self._adopt(task)
            for jid, _, _ in task.leases():
                self.orphans[jid] = now
        if self.tasks:
            log.info("reloaded %d tasks", len(self.tasks))

    def _task_from_row(self, row) -> Task:
        task = Task(id=row["id"], spec=stored_spec(row["spec"]), state=TaskState(row["state"]), owner=row["owner"],
                    created=row["created"], started=row["started"], finished=row["finished"],
                    baseline=row["baseline"], winner=row["winner"],
                    met_goal=None if row["met_goal"] is None else bool(row["met_goal"]), error=row["error"],
                    seq=row["seq"], jobs=Task.jobs_from_row(row), plan_s=row["plan_s"], artifact=row["artifact"],
                    candidate=row["candidate"], baseline_s=row["baseline_s"],
                    oplists=search.parse_oplists(json.loads(row["oplists"] or "null")) or {})
        task.baseline_figures, task.baseline_on = json.loads(row["baseline_figures"] or "[null, null]")
        rows = self.store.trials(task.id)
        task.trials = [Trial.from_row(r, task.objective.sign) for r in rows]
        for tr, r in zip(task.trials, rows):
            task.set_figures(tr, *json.loads(r["figures"] or "[null, null]"))
        task.index_trials()
        return task

    def _adopt(self, task: Task) -> None:
        self.tasks[task.id] = task
        self._index(task)

    def _index(self, task: Task) -> None:
        self._dirty = True
        if task.state is TaskState.QUEUED:
            self.queued.setdefault(self.priority(task), {})[task.id] = task
        elif not task.state.terminal:
            self.started[task.id] = task
        if not task.state.terminal:
            self.owners[task.owner] += 1

    def _unindex(self, task: Task) -> None:
        """Undo `_index` (call with the state the task was indexed in)."""
        self.queued.get(self.priority(task), {}).pop(task.id, None)
        self.started.pop(task.id, None)
        if not task.state.terminal:
            self.owners[task.owner] -= 1

    @staticmethod
    def priority(task: Task) -> int:
        return task.resources.priority

    def active(self) -> Iterator[Task]:
        for tier in self.queued.values():
            yield from tier.values()
        yield from self.started.values()

    def n_active(self) -> int:
        return sum(len(t) for t in self.queued.values()) + len(self.started)

    # ---- writes (every persisted change of a task goes through these) ----------------------------------

    def _write_task(self, task: Task, **fields: Any) -> None:
        self._touch(task)
        self.store.update_task(task.id, **fields)

    def _write_trial(self, task: Task, tr: Trial, **fields: Any) -> None:
        self._touch(task)
        self.store.update_trial(task.id, tr.index, **fields)

    def _move(self, task: Task, state: TaskState) -> None:
        self._touch(task)
        self._dirty = True
        self._unindex(task)
        task.move(state)
        self._index(task)

    def emit(self, task: Task, kind: str, **data: Any) -> None:
        self._touch(task)
        task.seq += 1
        body = {"task_id": task.id, "seq": task.seq, "ts": time.time(), "kind": kind, **data}
        self.store.set_seq(task.id, task.seq)
        self.effects.append(Event(task.id, body))

    def send(self, worker: Worker | bytes, cmd: Cmd, body: dict | None = None) -> None:
        identity = worker.identity if isinstance(worker, Worker) else worker
        self.effects.append(ToWorker(identity, cmd, body or {}))

    # ---- clients -----------------------------------------------------------------------------------

    def submit(self, spec: TaskSpec, owner: str = "", submit_id: str | None = None) -> str:
        if submit_id and (known := self.store.submitted(owner, submit_id)) in self.tasks:
            return known  # the same submission again (a client that failed over before its answer came)
        if self.owners[owner] >= self.limits.queued_per_client:
            raise ValueError(f"this tenant already has {self.owners[owner]} unfinished tasks (the broker's "
                             f"limit is {self.limits.queued_per_client}); wait for some to finish")
        task = Task(id=uuid.uuid4().hex[:12], spec=spec, state=TaskState.QUEUED, created=time.time(), owner=owner,
                    jobs={JobRef(PLAN.name): Lease()})
        with self.tx():
            self._touch(task)
            self.store.insert_task(task.id, task.name, task.spec_dict, task.state.value, task.created, owner, submit_id)
            self._write_task(task, jobs=task.jobs_plain())
            self._adopt(task)
            self.emit(task, "state", state=task.state.value)
        log.info("task %s (%s) queued", task.id, task.name)
        return task.id

    def cancel(self, task: Task) -> None:
        if not task.state.terminal:
            with self.tx():
                self.finish(task, TaskState.CANCELLED, error="cancelled by user")

    # ---- workers -------------------------------------------------------------------------------------

    def worker_for(self, identity: bytes, key: str | None) -> Worker | None:
        """The registered worker this message comes from: same identity and (under CURVE) same key."""
        worker = self.workers.get(identity.decode("ascii", "replace"))
        if worker is None or worker.identity != identity or worker.key != key:
            return None
        return worker

    def register(self, identity: bytes, body: dict, key: str | None, now: float) -> None:
        wid = identity.decode("ascii", "replace")
        if body["version"] != PROTOCOL_VERSION:
            return self._refuse(identity, f"protocol version {body['version']} not supported (broker speaks "
                                          f"{PROTOCOL_VERSION})")
        if body["worker_id"] != wid:
            return self._refuse(identity, "READY's worker_id differs from the connection's identity")
        if self.curve:
            owner = self.store.worker_key(wid)
            if owner is not None and owner != key:
                self.metrics.refused_workers.inc()
                log.warning("refused worker id %s from key %s: it belongs to key %s", wid, key, owner)
                return self._refuse(identity, f"worker id {wid!r} is bound to another key")
            if owner is None:
                self.store.bind_worker_key(wid, key)
        still_running = {(r[0], r[1]) for r in body["running"]}
        old = self.workers.get(wid)
        # The same live process registering again to drain gives back what it never started: not a failure.
        handback = body.get("draining") is True and old is not None and old.boot_id == body["boot_id"]
        if old is not None:
            self._forget_worker(old)
        shape = body.get("cores_per_trial")
        worker = Worker(id=wid, identity=identity, boot_id=body["boot_id"], host=body["host"], cores=body["cores"], slots=body["slots"],
                        version=str(body.get("nsd_version", "?")), registered=now, last_seen=now, key=key,
                        draining=body.get("draining") is True, versions=body.get("versions"),
                        trusted=self.trusted_worker(key), hardware=body.get("hardware"))
        worker.cores_per_trial = shape if shape is not None and shape <= worker.cores else \
            max(1, worker.cores // max(1, worker.slots))
        self.workers[wid] = worker
        acks = []
        for result in body["outbox"]:  # results it finished while it could not reach us: before any requeue
            self._result_in_savepoint(worker, result)
            acks.append({"trial_id": result["trial_id"], "attempt": result["attempt"]})
        # Leases this worker (or its previous incarnation) held: keep those it still runs, requeue the rest.
        for task in list(self.started.values()):
            for jid, attempt, holder in task.leases():
                if holder != wid:
                    continue
                if (jid, attempt) in still_running:
                    self._take(worker, jid, attempt, self.job_cores(task, worker))
                else:
                    self.lost_lease(task, parse_job_id(jid)[1], "worker restarted without it", handback=handback)
        self._index_free(worker)
        log.info("worker %s registered from %s: %d cores, %d slots%s", wid, worker.host, worker.cores,
                 worker.slots, " (again)" if old else "")
        self.send(worker, Cmd.READY_ACK, {"heartbeat_s": self.heartbeat_s, "liveness": self.liveness})
        self.drops_for(worker)  # erasures it may have missed while away
        for ack in acks:
            self.send(worker, Cmd.RESULT_ACK, ack)
        for jid, attempt in still_running:  # anything it runs that we no longer want: stop it
            if worker.running.get(jid) != attempt:
                self.send(worker, Cmd.CANCEL, {"trial_id": jid, "attempt": attempt})

    def _refuse(self, identity: bytes, reason: str) -> None:
        self.send(identity, Cmd.DISCONNECT, {"reason": reason, "fatal": True})

    def _forget_worker(self, worker: Worker) -> None:
        self.workers.pop(worker.id, None)
        self.free.pop(worker.id, None)
        now = time.time()
        for jid in worker.running:
            self.orphans.setdefault(jid, now)
        worker.running.clear(), worker.cores_of.clear()
        worker.cores_used = 0

    def drop_worker(self, worker: Worker, why: str, handback: bool = False) -> None:
        """The worker left or died: every lease it holds is lost (requeued, attempt + 1) — or, when it
        said goodbye handing its jobs back (a drain that ran out of time), requeued as they are."""
        held = list(worker.running)
        self._forget_worker(worker)
        with self.tx():
            for jid in held:
                self.orphans.pop(jid, None)
                task_id, job = parse_job_id(jid)
                task = self.tasks.get(task_id)
                if task is not None and not task.state.terminal and task.lease(job) is not None:
                    self.lost_lease(task, job, why, handback=handback)

    def unsent_assign(self, worker_id: str, jid: str, attempt: int) -> None:
        """The worker's queue was full when its ASSIGN went out: the job waits for a slot again, on the
        same attempt (the worker never had it), and the worker takes nothing new until it is heard from."""
        worker = self.workers.get(worker_id)
        if worker is None or not self.holds(worker, jid, attempt):
            return
        worker.congested = True
        task_id, job = parse_job_id(jid)
        self.lost_lease(self.tasks[task_id], job, "its assignment could not be sent", handback=True)

    def heard(self, worker: Worker) -> None:
        """Any message from a worker: it is alive, and it reads again if it was congested."""
        worker.last_seen = time.time()
        if worker.congested:
            worker.congested = False
            self._index_free(worker)

    def _take(self, worker: Worker, jid: str, attempt: int, cores: int) -> None:
        worker.take(jid, attempt, cores)
        self.orphans.pop(jid, None)
        self._index_free(worker)

    def _release(self, worker: Worker, jid: str) -> int | None:
        attempt = worker.release(jid)
        self._index_free(worker)
        return attempt

    def _index_free(self, worker: Worker) -> None:
        self._dirty = True
        if worker.free_cores > 0 and self.workers.get(worker.id) is worker:
            self.free[worker.id] = worker
        else:
            self.free.pop(worker.id, None)

    def holds(self, worker: Worker | None, jid: str, attempt: int) -> bool:
        """The lease rule: a result counts only from the registered worker holding (job, attempt) now."""
        if worker is None or self.workers.get(worker.id) is not worker:
            return False
        task_id, job = parse_job_id(jid)
        task = self.tasks.get(task_id)
        return task is not None and task.lease(job) == (attempt, worker.id)

    def idle(self) -> bool:
        """No task waits or runs: what workers send now can wait a few milliseconds."""
        return not self.started and not any(self.queued.values()) and not self.orphans

    # ---- time ----------------------------------------------------------------------------------------

    def check_liveness(self, now: float) -> None:
        deadline = self.heartbeat_s * self.liveness
        for worker in list(self.workers.values()):
            if now - worker.last_seen > deadline:
                log.warning("worker %s silent for %.1fs: declared dead", worker.id, now - worker.last_seen)
                self.drop_worker(worker, "worker stopped answering")
            elif heartbeat_due(now, worker.last_sent, self.heartbeat_s, self.liveness, busy=bool(worker.running)):
                self.send(worker, Cmd.HEARTBEAT)  # only to workers we have not spoken to lately
        # Leases whose worker is not registered (reloaded after a restart, or held by a worker we forgot)
        # wait one window for it to come back with them, then are lost.
        expired = [jid for jid, since in self.orphans.items() if now - since > deadline]
        if expired:
            with self.tx():
                for jid in expired:
                    self.orphans.pop(jid, None)
                    task_id, job = parse_job_id(jid)
                    task = self.tasks.get(task_id)
                    lease = task.lease(job) if task is not None and not task.state.terminal else None
                    if lease is not None and lease[1] not in self.workers:
                        self.lost_lease(task, job, "worker did not come back")

    def check_timeouts(self, now: float) -> None:
        for task in list(self.started.values()):
            budget = task.tuning.timeout_s
            if task.state is TaskState.TUNING and budget and task.started and now - task.started > budget:
                with self.tx():
                    decision = task.objective.decide(task.views(), exhausted=True)
                    self.conclude(task, decision, note=f"wall-clock budget of {budget:g}s ran out")
