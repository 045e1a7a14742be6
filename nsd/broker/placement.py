"""Placing waiting jobs on free cores: which job goes to which worker now (`scheduler.place`, pure), and
the ASSIGN that follows — built by the job's kind (`nsd.broker.jobs`): a plan, a trial with its early-stop
rule, or the save of the winner (sent to the worker that kept the winner's model when it can take it) —
or an answer from the metric cache.

A mixin of `nsd.broker.core.Core` (it uses Core's indexes, writes, effects and transactions): split out so
that each file reads in one sitting.
"""

from __future__ import annotations

import itertools
import time

from nsd.broker import scheduler
from nsd.broker.jobs import KINDS
from nsd.broker.model import Task, Worker
from nsd.protocol import TRIAL, Cmd, JobRef
from nsd.states import TaskState, TrialState


class Placement:
    # ---- scheduling ----------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Place waiting jobs on free cores. Costs nothing unless demand or free cores changed since the last
        pass, or without free cores; otherwise it looks at the started tasks (bounded by the cluster's slots)
        and, per priority tier, only as many queued tasks as could start now: work proportional to what can
        change, not to the length of the queue."""
        if not self._dirty:
            return  # nothing that could place a job changed (heartbeats, reads, ignored results)
        self._dirty = False
        if not self.free:
            return
        room = sum(w.free_cores for w in self.free.values()) if any(self.queued.values()) else 0
        demands = []
        for tier in sorted(self.queued, reverse=True):
            for task in itertools.islice(self.queued[tier].values(), room):
                demands.append(scheduler.Demand(task.id, 1, tier, cores=task.resources.cores_per_trial,
                                                label=task.resources.hardware))
        for task in self.started.values():
            if not task.wants_worker():
                continue
            cores = task.resources.cores_per_trial
            # Jobs other than trials are not counted against the task's `workers` limit.
            waiting = len(task.waiting()) + (task.dispatchable(task.resources.workers)
                                             if task.state is TaskState.TUNING else 0)
            if waiting:
                demands.append(scheduler.Demand(task.id, waiting, self.priority(task), task.n_running, cores,
                                                task.resources.hardware))
        demands.sort(key=lambda d: self.tasks[d.task_id].created)  # the scheduler's "age" is list order
        if demands:
            free = {w.id: w.free_cores for w in self.free.values()}
            placements = scheduler.place(free, demands, {w.id: w.cores_per_trial for w in self.free.values()},
                                         {w.id: (w.hardware or {}).get("label") for w in self.free.values()})
            self._answered_from_cache = False
            with self.tx():
                for task_id, worker_id in placements:
                    self._assign(self.tasks[task_id], self.workers[worker_id])
            if self._answered_from_cache and self._cache_rounds < 100:
                # Jobs answered from the cache moved tasks on: place what that made runnable, now.
                self._cache_rounds += 1
                self._dirty = True
                try:
                    self.schedule()
                finally:
                    self._cache_rounds -= 1
        for worker in self.free.values():  # a slot that stays free had no work waiting: not latency
            if worker.freed_at is not None and worker.free_cores >= worker.cores_per_trial:
                worker.freed_at = None

    def _assign(self, task: Task, worker: Worker) -> None:
        """Send `worker` the task's next job: a waiting job other than a trial (by its kind's order), else
        the lowest pending trial — or answer it from the metric cache."""
        if task.tuning.cache and self._answer_from_cache(task, worker):
            self._answered_from_cache = True
            return
        if task.state is TaskState.QUEUED:
            self._move(task, TaskState.PLANNING)
        waiting = task.waiting()
        ref = waiting[0] if waiting else JobRef(TRIAL, task.next_pending().index)
        worker, job = getattr(self, KINDS[ref.kind].assign)(task, ref, worker)
        jid, attempt = ref.id(task.id), task.lease(ref)[0]
        job["cores"] = self.job_cores(task, worker)
        self._take(worker, jid, attempt, job["cores"])
        self.metrics.jobs_dispatched.inc()
        if worker.freed_at is not None:
            self.metrics.dispatch_latency.observe(time.monotonic() - worker.freed_at)
            worker.freed_at = None
        self.send(worker, Cmd.ASSIGN, {"trial_id": jid, "attempt": attempt, "job": job})

    def _lease_to(self, task: Task, ref: JobRef, worker: Worker) -> None:
        """A waiting job other than a trial is now `worker`'s."""
        task.jobs[ref].worker = worker.id
        self._write_task(task, jobs=task.jobs_plain())

    # ---- the ASSIGN of each job kind (nsd.broker.jobs) ---------------------------------------------------

    def _plan_job(self, task: Task, ref: JobRef, worker: Worker) -> tuple[Worker, dict]:
        self._lease_to(task, ref, worker)
        task.started = task.started or time.time()
        self._write_task(task, state=task.state.value, started=task.started)
        self.emit(task, "state", state=task.state.value, worker=worker.id)
        return worker, {"kind": "plan", "task_id": task.id, "spec": task.spec_dict}

    def _trial_job(self, task: Task, ref: JobRef, worker: Worker) -> tuple[Worker, dict]:
        tr = task.trials[ref.index]
        task.set_state(tr, TrialState.RUNNING)
        tr.worker, tr.started = worker.id, time.time()
        self._write_trial(task, tr, state=tr.state.value, worker=worker.id, started=tr.started)
        self.emit(task, "trial", **tr.event(task.baseline_figures))
        job = {"kind": "trial", "task_id": task.id, "spec": task.spec_dict, "index": tr.index, "config": tr.config,
               "fallback": tr.fallback,
               # What it must reach to matter (early stop), and whether a pass should keep its model.
               "rule": task.stop_rule(tr.index), "keep": task.keeps(tr.index)}
        prune = task.prune_rule()
        if prune is not None:  # a figures objective with a passing trial: the figures to tie first
            job["prune"] = prune
        return worker, job

    def _save_job(self, task: Task, ref: JobRef, worker: Worker) -> tuple[Worker, dict]:
        winner = task.trials[task.winner]
        holder = self.workers.get(winner.kept[0]) if winner.kept else None
        if holder is not None and holder is not worker and holder.free_cores >= self.job_cores(task, holder):
            worker = holder  # the save job goes where the winner's model was kept, if free
        self._lease_to(task, ref, worker)
        job = {"kind": "save", "task_id": task.id, "spec": task.spec_dict, "index": winner.index,
               "config": winner.config, "fallback": winner.fallback}
        if winner.kept and winner.kept[0] == worker.id:
            job["kept"] = winner.kept[1]  # upload the model its trial kept instead of quantizing again
        return worker, job

    @staticmethod
    def job_cores(task: Task, worker: Worker) -> int:
        return task.resources.cores_per_trial or worker.cores_per_trial
