"""What the plan and baseline jobs' results do to a task, and how the metric cache answers them.

The **plan** expands the config set in INC's order: the task's trials exist once it lands (`tuning`), and they
start at once. The **baseline** job evaluates the FP32 model once and lists the ops the fallback search may
keep in FP32; it runs beside the first trials (placed first among the task's waiting jobs). Trials that finish
before it are `scored`: their metric is known, whether they pass is not; the baseline's result settles them,
trials still running learn the goal then (a `RULE` message: their early-stop rule), and trials started after
it carry it. So no slot waits for the baseline, and the answer is the same: pass or fail is INC's test against
the same baseline, and nothing is decided before it is known. A plan from before the split (a worker or a
cache entry that also carries `baseline` and `ops`) needs no baseline job.

A mixin of `nsd.broker.core.Core` (it uses Core's transactions, writes, effects and the outcomes' `settle` and
`finish`): its handlers are named by the plan and baseline rows of `nsd.broker.jobs`.
"""

from __future__ import annotations

import logging
import math
import time

from nsd.broker import search, tuner
from nsd.broker.jobs import BASELINE
from nsd.broker.metric_cache import hardware_key
from nsd.broker.model import Lease, Task, Trial, Worker
from nsd.broker.plan_check import check_plan
from nsd.protocol import TRIAL, Cmd, JobRef
from nsd.spec import first_trials
from nsd.states import TaskState, TrialState

log = logging.getLogger("nsd.broker")


class Planning:
    # ---- plan ----------------------------------------------------------------------------------------

    def _plan_from_cache(self, task: Task, ref: JobRef, worker: Worker) -> bool:
        plan = self.cache.get_plan(task, worker.versions)
        if plan is None or plan.get("baseline") is not None and not self._cached_fp32_figures(task, worker):
            return False  # (a plan from before the split has the baseline: FP32's figures must be known too)
        if task.state is TaskState.QUEUED:
            self._move(task, TaskState.PLANNING)
        task.started = task.started or time.time()
        self._write_task(task, state=task.state.value, started=task.started)
        del task.jobs[ref]
        self._plan_result(task, ref, {**plan, "ok": True, "seconds": 0.0})
        return True

    def _plan_result(self, task: Task, ref: JobRef, body: dict, worker: Worker | None = None) -> None:
        task.plan_s = body.get("seconds")
        baseline, configs = body.get("baseline"), body.get("configs")
        if not body["ok"]:
            return self.finish(task, TaskState.FAILED, error=f"planning failed: {body.get('error') or 'unknown error'}")
        oplists = search.parse_oplists(body.get("ops"))
        if configs is None or oplists is None or any(len(c["config"]) != 1 for c in configs):
            return self.finish(task, TaskState.FAILED, error="planning returned a malformed plan")
        if not configs:
            return self.finish(task, TaskState.FAILED, error="the config set expanded to no configs")
        wrong = check_plan(task.tuning.config_set, configs)
        if wrong is not None:  # a lease holder does not choose what is tried (issue 15)
            log.warning("task %s: refused the plan of worker %s: %s", task.id, worker.id if worker else "-", wrong)
            return self.finish(task, TaskState.FAILED, error=f"planning returned a plan that is not the config "
                                                             f"set's expansion: {wrong}")
        configs = first_trials(configs, task.tuning.max_trials)
        if worker is not None:  # a plan a worker ran (not one from the cache): remember it
            self.cache.put_plan(task, worker, configs, baseline, body.get("ops"))
        task.trials = [Trial(index=i, config=c["config"], label=c.get("label", "")) for i, c in enumerate(configs)]
        task.index_trials()
        if baseline is None:  # evaluated beside the first trials
            task.jobs[JobRef(BASELINE.name)] = Lease()
        else:  # a plan from before the split: it has the baseline and the op lists already (FP32's figures too)
            task.baseline, task.oplists = float(baseline), oplists
            if worker is not None:
                self._take_fp32_figures(task, body, worker)
        self._move(task, TaskState.TUNING)  # (marks scheduling dirty: new trials wait)
        self.store.insert_trials(task.id, [t.row() for t in task.trials])
        self._write_task(task, baseline=task.baseline, state=task.state.value, jobs=task.jobs_plain(),
                         plan_s=task.plan_s, oplists=search.oplists_to_plain(task.oplists),
                         baseline_figures=[task.baseline_figures, task.baseline_on])
        self.emit(task, "plan", baseline=task.baseline, trials=[t.described() for t in task.trials],
                  baseline_figures=task.baseline_figures, baseline_on=task.baseline_on)
        self.emit(task, "state", state=task.state.value)
        log.info("task %s: %d trials%s", task.id, len(task.trials),
                 "" if task.baseline is None else f", baseline {task.baseline:.6g}")

    def _plan_gave_up(self, task: Task, ref: JobRef, attempt: int, why: str) -> None:
        self.finish(task, TaskState.FAILED, error=f"planning failed {attempt} times: {why}")

    # ---- baseline ------------------------------------------------------------------------------------

    def _baseline_from_cache(self, task: Task, ref: JobRef, worker: Worker) -> bool:
        known = self.cache.get_baseline(task, worker.versions, self.families(task))
        if known is None:
            return False
        if not self._cached_fp32_figures(task, worker):  # not measured on this kind of machine: run it here
            return False
        del task.jobs[ref]
        self._baseline_result(task, ref, {**known, "ok": True, "seconds": 0.0})
        return True

    @staticmethod
    def families(task: Task) -> dict[str, dict]:
        """The first config of each INC config family in the task's config trials: what the baseline job lists
        ops for (a PT2E family's ops are those of the graph its configs quantize)."""
        out: dict[str, dict] = {}
        for tr in task.trials:
            if tr.stage == search.CONFIG:
                out.setdefault(next(iter(tr.config)), tr.config)
        return out

    def _baseline_result(self, task: Task, ref: JobRef, body: dict, worker: Worker | None = None) -> None:
        """The FP32 metric: the goal is known; trials scored beside it pass or fail now."""
        if not body["ok"]:
            return self.finish(task, TaskState.FAILED,
                               error=f"evaluating the FP32 baseline failed: {body.get('error') or 'unknown error'}")
        baseline, oplists = body.get("baseline"), search.parse_oplists(body.get("ops"))
        if not isinstance(baseline, (int, float)) or isinstance(baseline, bool) or not math.isfinite(baseline) \
                or oplists is None:
            return self.finish(task, TaskState.FAILED, error="the baseline job returned a malformed answer")
        if worker is not None:
            self.cache.put_baseline(task, worker, self.families(task), float(baseline), body.get("ops"))
            self._take_fp32_figures(task, body, worker)
        task.baseline, task.oplists, task.baseline_s = float(baseline), oplists, body.get("seconds")
        self._write_task(task, baseline=task.baseline, oplists=search.oplists_to_plain(oplists),
                         baseline_s=task.baseline_s, baseline_figures=[task.baseline_figures, task.baseline_on])
        self.emit(task, "baseline", baseline=task.baseline, baseline_figures=task.baseline_figures,
                  baseline_on=task.baseline_on)
        log.info("task %s: baseline %.6g", task.id, task.baseline)
        goal, figures_of = task.goal(), []
        for tr in task.trials:
            if tr.state is TrialState.SCORED:
                task.set_state(tr, TrialState.PASSED if tuner.meets_goal(tr.metric, goal) else TrialState.FAILED_GOAL)
                self._write_trial(task, tr, state=tr.state.value)
                self.metrics.trial_finished(tr.state.value)
                self.emit(task, "trial", **task.trial_event(tr))
                if tr.state is TrialState.PASSED and tr.figures is None and self._wants_figures(task, tr.metric):
                    figures_of.append(tr.index)  # it ran before anyone knew it would pass: measure it now
            elif tr.state is TrialState.RUNNING and tr.worker in self.workers \
                    and (rule := task.stop_rule(tr.index)) is not None:  # it may stop early from here on
                self.send(self.workers[tr.worker], Cmd.RULE,
                          {"trial_id": JobRef(TRIAL, tr.index).id(task.id), "attempt": tr.attempt, "rule": rule})
        self._want_refines(task, frozenset(figures_of))  # (run again with the goal known: its figures)
        self._dirty = True  # trials placed from now on carry the goal
        self.settle(task)

    def _take_fp32_figures(self, task: Task, body: dict, worker: Worker) -> None:
        """FP32's deployment figures (issue 17), with its metric; None: the recipe gives no benchmark batch."""
        if task.tuning.measure == "none":
            return
        task.baseline_figures = body.get("figures")
        task.baseline_on = worker.hardware if task.baseline_figures else None
        self.cache.put_figures(task, worker, hardware_key(worker.hardware, self.job_cores(task, worker)),
                               None, None, task.baseline_figures)

    def _cached_fp32_figures(self, task: Task, worker: Worker) -> bool:
        """FP32's figures on this kind of machine from the cache, where the task measures: False if unknown."""
        if task.tuning.measure == "none":
            return True
        fp32 = self.cache.get_figures(task, worker.versions,
                                      hardware_key(worker.hardware, self.job_cores(task, worker)))
        if fp32 is None:
            return False
        task.baseline_figures, task.baseline_on = fp32["figures"], worker.hardware if fp32["figures"] else None
        return True

    def _baseline_gave_up(self, task: Task, ref: JobRef, attempt: int, why: str) -> None:
        self.finish(task, TaskState.FAILED, error=f"evaluating the FP32 baseline failed {attempt} times: {why}")
