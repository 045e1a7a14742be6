"""What a job's result does to its task: trial metrics, refines, saved artifacts, the decisions that follow
(settle, the fallback search's next stage, conclude), cancellations, lost leases and endings (the plan
and baseline jobs' are `nsd.broker.planning`).

A mixin of `nsd.broker.core.Core` (it uses Core's transactions, writes, effects and indexes): split out
so that each file reads in one sitting. Every method here runs inside a `Core.tx()`.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Any

from nsd.broker import search, tuner
from nsd.broker.intervals import finite, stop_interval
from nsd.broker.jobs import KINDS, REFINE, SAVE
from nsd.broker.metric_cache import hardware_key
from nsd.broker.model import Lease, Task, Trial, Worker
from nsd.figures import loses
from nsd.broker.store import StorageError
from nsd.protocol import TRIAL, Cmd, JobRef, parse_job_id
from nsd.states import TaskState, TrialState

log = logging.getLogger("nsd.broker")

LOG_LIMIT = 64 * 1024  # characters of each job's log kept by the broker (the worker keeps the whole file)


class Outcomes:
    # ---- results -------------------------------------------------------------------------------------

    def _result_in_savepoint(self, worker: Worker, body: dict) -> None:
        try:
            with self.tx():
                self.result(worker, body)
        except StorageError:
            raise
        except Exception:  # a bug of ours: this result is dropped, the others still count
            log.exception("applying a result of %s failed", worker.id)

    def result(self, worker: Worker | None, body: dict) -> None:
        """Apply a job result at most once, and only from the lease holder (see `holds`)."""
        jid, attempt = body["trial_id"], body["attempt"]
        if not self.holds(worker, jid, attempt):
            self.ignored_results += 1
            self.metrics.ignored_results.inc()
            return  # a duplicate, a late answer to a lease requeued or cancelled, or not this peer's to give
        task_id, job = parse_job_id(jid)
        task = self.tasks[task_id]
        self._release(worker, jid)
        worker.freed_at = time.monotonic()
        self._keep_log(task, job.name, body, worker.id)
        if body.get("handback") is True:  # a draining worker returns a job it did not run to the end
            self.lost_lease(task, job, "handed back by a draining worker", handback=True)
        elif body.get("requeue") is True:  # the worker could not get the task's files
            self.lost_lease(task, job, body.get("error") or "worker could not start the job")
        else:
            kind = KINDS[job.kind]
            if not kind.in_trial:  # done with: the handler may want another job of the kind
                del task.jobs[job]
                self._write_task(task, jobs=task.jobs_plain())
            getattr(self, kind.result)(task, job, body, worker)

    def _trial_result(self, task: Task, ref: JobRef, body: dict, worker: Worker) -> None:
        tr = task.trials[ref.index]
        tr.finished = time.time()
        tr.seconds = body.get("seconds")
        stopped = stop_interval(body, task.objective.sign) if body["ok"] and body.get("stopped_early") is True \
            else None
        fallback = getattr(tr, "fallback", None)
        figures = body.get("figures") if body["ok"] and task.tuning.measure != "none" else None
        if figures is not None:
            self._take_figures(task, tr, figures, worker)
        if body["ok"] and body.get("pruned") is True and body.get("metric") is None:
            prune = task.prune_rule()
            if prune is not None and loses(figures, prune):  # checked here too: a worker's word is not enough
                tr.pruned, tr.error = True, "not evaluated: its figures lose to a passing trial's by more than the margin"
                task.set_state(tr, TrialState.CANCELLED)
                return self._finish_trial(task, tr)
            task.set_state(tr, TrialState.ERROR)
            tr.error = "the worker did not evaluate it, but its figures do not lose to a passing trial's"
        elif body["ok"] and body.get("metric") is not None:
            self._score(task, tr, float(body["metric"]))
            if tr.state is TrialState.PASSED and body.get("kept"):
                tr.kept = (worker.id, body["kept"])
            self.cache.put_trial(task, worker, tr.config, fallback, tr.metric)
        elif stopped is not None and task.baseline is not None and not tuner.meets_goal(stopped[0], task.goal()):
            # It cannot meet the goal (First.stop_rule): its interval stands for its metric until a decision
            # needs more (a refine job).
            self._score(task, tr, None, *stopped)
            self.cache.put_trial(task, worker, tr.config, fallback, None, *stopped)
        else:
            task.set_state(tr, TrialState.ERROR)
            tr.error = (body.get("error") or "the runner returned no metric")[:4000]
        self._finish_trial(task, tr)

    def _take_figures(self, task: Task, tr: Trial, figures: dict, worker: Worker) -> None:
        """A trial's deployment figures (issue 17), kept per hardware in the cache."""
        task.set_figures(tr, figures, worker.hardware)
        self.cache.put_figures(task, worker, hardware_key(worker.hardware, self.job_cores(task, worker)),
                               tr.config, getattr(tr, "fallback", None), figures)

    def _score(self, task: Task, tr: Trial, metric: float | None, bound: float | None = None,
               low: float | None = None, high: float | None = None) -> None:
        """Metric -> trial state, for a result and a cache answer alike: a full metric passes or fails the goal
        (scored while the baseline is not known); without one, the interval it stopped with fails it."""
        if metric is not None:
            tr.metric = metric
            task.set_state(tr, TrialState.SCORED if task.baseline is None else TrialState.PASSED
                           if tuner.meets_goal(metric, task.goal()) else TrialState.FAILED_GOAL)
        else:
            tr.bound, tr.low, tr.high, tr.stopped_early = bound, low, high, True
            task.set_state(tr, TrialState.FAILED_GOAL)

    def _finish_trial(self, task: Task, tr: Trial) -> None:
        self._write_trial(task, tr, state=tr.state.value, metric=tr.metric, seconds=tr.seconds,
                          finished=tr.finished, error=tr.error, bound=tr.bound, stopped_early=tr.stopped_early,
                          low=tr.low, high=tr.high, cached=tr.cached, pruned=tr.pruned,
                          figures=None if tr.figures is None else [tr.figures, tr.measured_on])
        if tr.state.finished:  # (a scored trial is counted when the baseline decides it)
            self.metrics.trial_finished(tr.state.value)
        self.emit(task, "trial", **task.trial_event(tr))
        self.settle(task)

    def _answer_from_cache(self, task: Task, worker: Worker) -> bool:
        """Answer the job `_assign` would give `worker` from the metric cache (nsd.broker.metric_cache), as
        far as it can (its kind's `cached` handler). True: nothing is left to send now (`schedule` places
        again: the task has moved on)."""
        waiting = task.waiting()
        kind = KINDS[waiting[0].kind] if waiting else KINDS[TRIAL]
        if kind.cached is None:
            return False
        return getattr(self, kind.cached)(task, waiting[0] if waiting else None, worker)

    def _save_from_cache(self, task: Task, ref: JobRef, worker: Worker) -> bool:
        winner = task.trials[task.winner]
        sha = self.cache.get_artifact(task, worker.versions, winner.config, getattr(winner, "fallback", None))
        if sha is None or not self.blobs.has(sha):
            return False
        del task.jobs[ref]
        self._save_result(task, ref, {"ok": True, "artifact": sha})
        return True

    def _trials_from_cache(self, task: Task, ref: None, worker: Worker) -> bool:
        """Pending trials in order until one is not known."""
        versions = worker.versions
        answered = False
        while task.state is TaskState.TUNING and task.n_pending:
            tr = task.trials[task.pending[0]]
            if tr.state is not TrialState.PENDING:
                heapq.heappop(task.pending)  # a stale entry
                continue
            known = self.cache.get_trial(task, versions, tr.config, getattr(tr, "fallback", None))
            if known is None:
                return answered
            metric = finite(known.get("metric"))
            stopped = None if metric is not None else stop_interval(known, task.objective.sign)
            if metric is None and (stopped is None or not task.may_stop(tr.index)
                                   or tuner.meets_goal(stopped[0], task.goal())):
                return answered  # this task would run it further (it might meet this goal; no early stop): run it
            if self._wants_figures(task, metric):
                known = self.cache.get_figures(task, versions, hardware_key(worker.hardware,
                                                                                 self.job_cores(task, worker)),
                                               tr.config, getattr(tr, "fallback", None))
                if known is None or known["figures"] is None:
                    return answered  # not measured on this kind of machine: run it here
                task.set_figures(tr, known["figures"], worker.hardware)
            task.next_pending()
            now = time.time()
            tr.cached, tr.worker, tr.started, tr.finished, tr.seconds = True, None, now, now, 0.0
            self._score(task, tr, metric, *(stopped or ()))
            self._finish_trial(task, tr)
            answered = True
        return True

    @staticmethod
    def _wants_figures(task: Task, metric: float | None) -> bool:
        """Whether a trial with this metric carries figures in this task (tuning.measure; none where the
        recipe gave FP32 no benchmark batch)."""
        mode = task.tuning.measure
        if metric is None or mode == "none" or task.baseline_figures is None:
            return False
        return mode == "all" or tuner.meets_goal(metric, task.goal())

    def _keep_log(self, task: Task, job: str, body: dict, worker: str) -> None:
        text = body.get("log")
        if text:
            self.store.put_log(task.id, job, body["attempt"], worker, text[-LOG_LIMIT:])

    def _save_result(self, task: Task, ref: JobRef, body: dict, worker: Worker | None = None) -> None:
        sha = body.get("artifact")
        # A worker's artifact must be bytes it stored itself (under this save's lease): naming any other blob
        # would hand someone else's model out as this task's (issue 15).
        if body["ok"] and sha is not None and self.blobs.has(sha) and (worker is None or self.stored_by(worker, sha)):
            if worker is not None:  # checked before it is handed out (nsd.broker.verification)
                return self._to_verify(task, sha, worker)
            self._hand_out(task, sha)  # from the cache: verified when it was first saved
        else:
            why = body.get("error") or ("the worker named an artifact it did not upload" if body["ok"] and sha
                                        else "the worker returned no artifact")
            self.finish(task, TaskState.DONE, winner=task.winner, met_goal=task.met_goal,
                        error=f"the winner's artifact could not be saved: {why}")

    # ---- decisions -------------------------------------------------------------------------------

    def settle(self, task: Task) -> None:
        """After any trial change: cancel what can no longer win (objective.to_cancel), add the fallback search's
        next stage once it is known (search.next_stage), and end the task once decided (search.decide) —
        which, with those cancelled, is when no trial is left unfinished and no stage is left to add."""
        passed = task.lowest_passed
        if passed is not None and passed != task.cancelled_above:  # (cancellations follow a new pass only)
            for index in task.objective.to_cancel(task.views()):
                self._cancel_trial(task, task.trials[index], "a lower-index trial met the goal")
            task.cancelled_above = passed
        if task.state is not TaskState.TUNING or task.baseline is None:
            return  # (before the baseline nothing has passed or failed: nothing to decide)
        last = task.trials[-1].stage if task.trials else None
        staged = passed is None and task.tuning.strategy == "basic" and last != search.ACCUMULATED \
            and (last != search.CONFIG or task.n_unfinished == 0)  # cheap gates: most results add nothing
        if staged:
            self._add_stage(task, search.next_stage(task.layout(), task.steps()))
        if staged or (task.n_unfinished == 0 and passed is None):
            self._want_refines(task, search.refines(task.layout(), task.steps()))
        if task.n_unfinished == 0 and not any(ref.kind == REFINE.name and task.trials[ref.index].metric is not None
                                              for ref in task.jobs):  # (figures of a pass scored before the baseline)
            decision = search.decide(task.layout(), task.steps())
            if decision is not None:  # (None: stopped trials are being refined first)
                self.conclude(task, decision)

    def _want_refines(self, task: Task, indexes: frozenset[int]) -> None:
        """Stopped trials whose full metric a decision needs (search.refines): each gets a refine job."""
        new = [i for i in sorted(indexes) if JobRef(REFINE.name, i) not in task.jobs and task.trials[i].refine is None]
        if not new:
            return
        for i in new:
            task.jobs[JobRef(REFINE.name, i)] = Lease()
        self._dirty = True  # refine jobs wait for slots
        self._write_task(task, jobs=task.jobs_plain())
        for i in new:
            self.emit(task, "trial", **task.trial_event(task.trials[i]))
        log.info("task %s: refining trials %s (their intervals cannot decide)", task.id, ", ".join(map(str, new)))

    def _refine_result(self, task: Task, ref: JobRef, body: dict, worker: Worker) -> None:
        """A trial run again in full. One that stopped early: its full metric, which must lie in its interval and
        miss the goal. One scored before the baseline that passes: its deployment figures, with the same
        metric. Otherwise this worker's run disagrees with the first one: what was asked cannot be had."""
        tr = task.trials[ref.index]
        metric = finite(body.get("metric")) if body["ok"] else None
        tr.seconds = (tr.seconds or 0.0) + (finite(body.get("seconds")) or 0.0)
        if tr.stopped_early and metric is not None and (tr.low is not None and metric < tr.low or tr.high is not None
                                                         and metric > tr.high or tuner.meets_goal(metric, task.goal())):
            metric, why = None, f"its full metric {metric!r} lies outside its early-stop interval [{tr.low}, {tr.high}]"
        elif not tr.stopped_early and metric is not None and metric != tr.metric:
            metric, why = None, f"its metric {metric!r} differs from its first run's ({tr.metric!r})"
        else:
            why = body.get("error") or "the runner returned no metric"
        if metric is None:
            self._refine_gave_up(task, ref, 1, why)
            return
        figures = body.get("figures") if task.tuning.measure != "none" else None
        if figures is not None:
            self._take_figures(task, tr, figures, worker)
        tr.metric, tr.refine = metric, "done"
        self.cache.put_trial(task, worker, tr.config, getattr(tr, "fallback", None), metric)
        self._write_trial(task, tr, metric=metric, refine=tr.refine, seconds=tr.seconds,
                          figures=None if tr.figures is None else [tr.figures, tr.measured_on])
        self.emit(task, "trial", **task.trial_event(tr))
        self.settle(task)

    def _refine_gave_up(self, task: Task, ref: JobRef, attempt: int, why: str) -> None:
        """No full metric for this stopped trial: decisions treat it like a trial that errored."""
        tr = task.trials[ref.index]
        tr.refine, tr.error = "failed", f"refine failed: {why}"[:4000]
        self._write_trial(task, tr, refine=tr.refine, error=tr.error)
        self.emit(task, "trial", **task.trial_event(tr))
        self.settle(task)

    def _add_stage(self, task: Task, new: list[search.NewTrial]) -> None:
        """Append trials of the fallback search (a trial's index is its place in the global order)."""
        if not new:
            return
        first = len(task.trials)
        for k, n in enumerate(new):
            base = task.trials[n.base]
            task.trials.append(Trial(index=first + k, config=base.config, stage=n.stage, fallback=list(n.fallback),
                                     base=n.base, label=search.fallback_label(base.label, n.fallback)[:500]))
        task.index_trials()
        self._touch(task)
        self._dirty = True  # new trials wait for slots
        self.store.insert_trials(task.id, [t.row() for t in task.trials[first:]])
        self.emit(task, "stage", trials=[t.described() for t in task.trials[first:]])
        log.info("task %s: %d %s trials added", task.id, len(new), "/".join(sorted({n.stage for n in new})))

    def conclude(self, task: Task, decision: tuner.Decision, note: str | None = None) -> None:
        """The winner is known: stop the other trials, then save its artifact (`finalizing`)."""
        if decision.winner is None:
            return self.finish(task, TaskState.FAILED, error=note or "no trial produced a metric (every trial errored)")
        for tr in task.trials:
            if not tr.state.finished:
                self._cancel_trial(task, tr, "the task is decided")
        for ref, lease in list(task.jobs.items()):  # refines no decision needs any more
            self._stop_job(task, ref.id(task.id), lease.attempt, lease.worker)
        task.jobs.clear()
        self._move(task, TaskState.FINALIZING)
        task.winner, task.met_goal, task.error = decision.winner, decision.met_goal, note
        task.jobs[JobRef(SAVE.name)] = Lease()
        self._write_task(task, state=task.state.value, winner=task.winner, met_goal=task.met_goal, error=note,
                         jobs=task.jobs_plain())
        self.emit(task, "state", state=task.state.value, winner=task.winner, met_goal=task.met_goal, error=note)

    def _cancel_trial(self, task: Task, tr: Trial, why: str) -> None:
        jid = JobRef(TRIAL, tr.index).id(task.id)
        if tr.state is TrialState.RUNNING:
            self._stop_job(task, jid, tr.attempt, tr.worker)
        task.set_state(tr, TrialState.CANCELLED)
        tr.error, tr.finished = why, time.time()
        self._write_trial(task, tr, state=tr.state.value, error=why, finished=tr.finished)
        self.emit(task, "trial", **task.trial_event(tr))

    def _stop_job(self, task: Task, jid: str, attempt: int, wid: str | None) -> None:
        self.orphans.pop(jid, None)
        worker = self.workers.get(wid or "")
        if worker is not None and self._release(worker, jid) is not None:
            self.send(worker, Cmd.CANCEL, {"trial_id": jid, "attempt": attempt})

    def finish(self, task: Task, state: TaskState, winner: int | None = None, met_goal: bool | None = None,
               error: str | None = None) -> None:
        for tr in task.trials:
            if not tr.state.finished:
                self._cancel_trial(task, tr, "task ended")
        for ref, lease in task.jobs.items():
            self._stop_job(task, ref.id(task.id), lease.attempt, lease.worker)
        task.jobs.clear()
        self._move(task, state)
        task.winner, task.met_goal, task.error = winner, met_goal, error
        task.finished = time.time()
        self._write_task(task, state=state.value, winner=winner, met_goal=met_goal, error=error,
                         finished=task.finished, jobs=[])
        self.emit(task, "state", state=state.value, winner=winner, met_goal=met_goal, error=error)
        log.info("task %s %s%s", task.id, state.value,
                 f": winner trial {winner} (met goal: {met_goal})" if winner is not None else
                 f": {error}" if error else "")

    def lost_lease(self, task: Task, job: JobRef, why: str = "worker lost", handback: bool = False) -> None:
        """A job's worker died, forgot it or handed it back: run it again (attempt + 1), or give up after
        max_attempts (its kind's `give_up`; a trial is `error`). A hand-back (`handback`: a draining worker
        returning work it never finished) runs it again without using up an attempt: it was not the job's
        fault."""
        lease = task.lease(job)
        if lease is None:
            return
        self._dirty = True
        jid = job.id(task.id)
        self.orphans.pop(jid, None)
        holder = self.workers.get(lease[1] or "")
        if holder is not None:
            self._release(holder, jid)
        if handback:  # same attempt, any worker: the lease rule still refuses the old holder's answers
            state, attempt = TrialState.PENDING, lease[0]
        else:
            state, attempt = tuner.after_lost_lease(lease[0], task.tuning.max_attempts)
        kind = KINDS[job.kind]
        if not kind.in_trial:
            if state is TrialState.ERROR:
                del task.jobs[job]
                self._write_task(task, jobs=task.jobs_plain())
                return getattr(self, kind.give_up)(task, job, attempt, why)
            task.jobs[job] = Lease(attempt)
            self._write_task(task, jobs=task.jobs_plain())
            if job.index is not None:
                self.emit(task, "trial", **task.trial_event(task.trials[job.index]))
            else:
                self.emit(task, "state", state=task.state.value, reason=why)
            return
        tr = task.trials[job.index]
        if state is TrialState.PENDING:
            self.metrics.trials_requeued.inc()
        task.set_state(tr, state)
        tr.attempt, tr.worker = attempt, None
        if state is TrialState.ERROR:
            tr.error, tr.finished = f"{why} on each of {attempt} attempts", time.time()
        self._write_trial(task, tr, state=state.value, attempt=attempt, worker=None, error=tr.error,
                          finished=tr.finished)
        self.emit(task, "trial", **task.trial_event(tr))
        self.settle(task)

    def _save_gave_up(self, task: Task, ref: JobRef, attempt: int, why: str) -> None:
        self.finish(task, TaskState.DONE, winner=task.winner, met_goal=task.met_goal,
                    error=f"the winner's artifact could not be saved ({attempt} attempts): {why}")
