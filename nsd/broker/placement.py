"""Placing waiting jobs on free cores: which job goes to which worker now (`scheduler.place`, pure), and
the ASSIGN that follows — a plan, a trial with its early-stop rule, or the save of the winner (sent to
the worker that kept the winner's model when it can take it), or an answer from the metric cache.

A mixin of `nsd.broker.core.Core` (it uses Core's indexes, writes, effects and transactions): split out so
that each file reads in one sitting.
"""

from __future__ import annotations

import itertools
import time

from nsd.broker import scheduler
from nsd.broker.model import PLAN, SAVE, STAGE_JOBS, Task, Worker, job_id
from nsd.protocol import Cmd
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
                demands.append(scheduler.Demand(task.id, 1, tier, cores=task.resources.cores_per_trial))
        for task in self.started.values():
            if not task.wants_worker():
                continue
            cores = task.resources.cores_per_trial
            if task.state in STAGE_JOBS:
                demands.append(scheduler.Demand(task.id, 1, self.priority(task), cores=cores))
            elif task.dispatchable(task.resources.workers):
                demands.append(scheduler.Demand(task.id, task.dispatchable(task.resources.workers),
                                                self.priority(task), task.n_running, cores))
        demands.sort(key=lambda d: self.tasks[d.task_id].created)  # the scheduler's "age" is list order
        if demands:
            free = {w.id: w.free_cores for w in self.free.values()}
            placements = scheduler.place(free, demands, {w.id: w.cores_per_trial for w in self.free.values()})
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
        now = time.time()
        if task.tuning.cache and self._answer_from_cache(task, worker):
            self._answered_from_cache = True
            return
        if task.state is TaskState.FINALIZING:  # the save job goes where the winner's model was kept, if free
            kept = task.trials[task.winner].kept
            holder = self.workers.get(kept[0]) if kept else None
            if holder is not None and holder is not worker and holder.free_cores >= self.job_cores(task, holder):
                worker = holder
        if task.state is TaskState.QUEUED:
            self._move(task, TaskState.PLANNING)
        if task.state is TaskState.PLANNING:
            task.stage_worker = worker.id
            task.started = task.started or now
            jid, attempt = job_id(task.id, PLAN), task.stage_attempt
            job = {"kind": "plan", "task_id": task.id, "spec": task.spec_dict}
            self._write_task(task, state=task.state.value, stage_worker=worker.id, started=task.started)
            self.emit(task, "state", state=task.state.value, worker=worker.id)
        elif task.state is TaskState.FINALIZING:
            task.stage_worker = worker.id
            jid, attempt = job_id(task.id, SAVE), task.stage_attempt
            winner = task.trials[task.winner]
            job = {"kind": "save", "task_id": task.id, "spec": task.spec_dict, "index": winner.index,
                   "config": winner.config, "fallback": winner.fallback}
            if winner.kept and winner.kept[0] == worker.id:
                job["kept"] = winner.kept[1]  # upload the model its trial kept instead of quantizing again
            self._write_task(task, stage_worker=worker.id)
        else:
            tr = task.next_pending()
            task.set_state(tr, TrialState.RUNNING)
            tr.worker, tr.started = worker.id, now
            jid, attempt = job_id(task.id, tr.index), tr.attempt
            job = {"kind": "trial", "task_id": task.id, "spec": task.spec_dict, "index": tr.index, "config": tr.config,
                   "fallback": tr.fallback,
                   # What it must reach to matter (early stop), and whether a pass should keep its model.
                   "rule": task.stop_rule(tr.index),
                   "keep": task.lowest_passed is None or task.lowest_passed > tr.index}
            self._write_trial(task, tr, state=tr.state.value, worker=worker.id, started=now)
            self.emit(task, "trial", **tr.event())
        job["cores"] = self.job_cores(task, worker)
        self._take(worker, jid, attempt, job["cores"])
        self.metrics.jobs_dispatched.inc()
        if worker.freed_at is not None:
            self.metrics.dispatch_latency.observe(time.monotonic() - worker.freed_at)
            worker.freed_at = None
        self.send(worker, Cmd.ASSIGN, {"trial_id": jid, "attempt": attempt, "job": job})

    @staticmethod
    def job_cores(task: Task, worker: Worker) -> int:
        return task.resources.cores_per_trial or worker.cores_per_trial
