"""The broker's model: tasks, their trials, workers, and the one lease rule — plain data, no I/O.

A *job* is what a worker runs for a task; its kinds are one table (`nsd.broker.jobs`): the plan
(`<task>/plan`), a trial (`<task>/<index>`), the save of the winner (`<task>/save`), ... Each job has at most
one *lease* at a time, `(attempt, worker id)`, and `Task.lease()` is the only place that says who holds it:
a trial's lease is the trial's own attempt and worker while it runs; any other job's is its `Lease` in
`Task.jobs`, present exactly while the task wants that job. A result counts only from the registered worker
that holds that lease now (`nsd.broker.core.Core.holds`).

Every task and trial state change goes through `Task.move` / `Task.set_state`, checked against the
transition tables in `nsd.states`; `Task` keeps a running tally of its trials so that the hot path (every
result, every scheduling pass) never rescans thousands of them. The task's objective
(`nsd.broker.objective`) is the reference (`tests/test_broker.py` drives the real settle path against it).
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from nsd.broker import search, tuner
from nsd.broker.intervals import stop_interval
from nsd.broker.jobs import KINDS, PLAN, REFINE, SAVE
from nsd.broker.objective import Objective, objective_for
from nsd.figures import cost as figures_cost
from nsd.figures import pareto_of
from nsd.figures import summary as figures_summary
from nsd.protocol import TRIAL, JobRef
from nsd.spec import ResourcesSpec, TaskSpec, TuningSpec
from nsd.states import TASK_TRANSITIONS, TRIAL_TRANSITIONS, TaskState, TrialState, check_transition


@dataclass
class Lease:
    """A job's lease other than a trial's: its attempt, and the worker running it (None: waiting for a slot)."""
    attempt: int = 1
    worker: str | None = None


@dataclass
class Trial:
    index: int
    config: dict
    label: str
    state: TrialState = TrialState.PENDING
    attempt: int = 1
    metric: float | None = None
    worker: str | None = None
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    error: str | None = None
    stage: str = search.CONFIG  # the fallback search's stage (nsd/broker/search.py)
    fallback: list[str] = field(default_factory=list)  # op names kept in FP32 on top of `config`
    base: int | None = None  # the config trial a fallback trial builds on
    bound: float | None = None  # stopped early: the best metric it could still have reached
    stopped_early: bool = False
    low: float | None = None  # stopped early: its full metric lies in [low, high] (None: unbounded that way)
    high: float | None = None
    refine: str | None = None  # its refine job (a stopped trial evaluated in full): "done", "failed" or None
    cached: bool = False  # answered from the metric cache, not run
    kept: tuple[str, str] | None = None  # (worker, folder) where its passing model was kept (not persisted)
    figures: dict | None = None  # deployment figures (nsd/figures.py), measured on the hardware `measured_on`
    measured_on: dict | None = None  # READY's `hardware` of the worker that measured them
    pruned: bool = False  # not evaluated: its figures already lost to a passing trial's (ByFigures.prune)
    cost: float | None = None  # its cost under the task's figures objective (Task.set_figures), lower is better

    @classmethod
    def from_row(cls, r, sign: int) -> Trial:
        """A trial from its `trials` row (sign: 1 where higher is better)."""
        tr = cls(index=r["idx"], config=json.loads(r["config"]), label=r["label"], state=TrialState(r["state"]),
                 attempt=r["attempt"], metric=r["metric"], worker=r["worker"], started=r["started"],
                 finished=r["finished"], seconds=r["seconds"], error=r["error"], stage=r["stage"],
                 fallback=json.loads(r["fallback"]), base=r["base"], bound=r["bound"],
                 stopped_early=bool(r["stopped_early"]), cached=bool(r["cached"]), low=r["low"], high=r["high"],
                 refine=r["refine"])
        if tr.stopped_early and tr.low is None and tr.high is None and tr.bound is not None:
            _, tr.low, tr.high = stop_interval({"bound": tr.bound}, sign)  # stopped before intervals were kept
        return tr

    def view(self) -> tuner.TrialView:
        if self.refine == "failed" and self.stopped_early:  # no full metric: to decisions, like an errored trial
            return tuner.TrialView(self.index, self.state, cost=self.cost)
        return tuner.TrialView(self.index, self.state, self.metric, self.cost, self.low, self.high)

    def step(self) -> search.Step:
        v = self.view()
        return search.Step(self.index, self.stage, tuple(self.fallback),
                           self.index if self.base is None else self.base, self.state, v.metric, self.cost, v.low,
                           v.high)

    def described(self) -> dict[str, Any]:
        """What a trial is (in `plan` and `stage` events and in the task view)."""
        return {"index": self.index, "config": self.config, "label": self.label, "stage": self.stage,
                "fallback": self.fallback}

    def row(self) -> tuple:
        """Its row for `Store.insert_trials`."""
        return self.index, self.config, self.label, self.state.value, self.stage, self.fallback, self.base

    def public(self, baseline_figures: dict | None = None, refine: str | None = None) -> dict[str, Any]:
        return {**self.described(), **self.event(baseline_figures, refine)}

    def event(self, baseline_figures: dict | None = None, refine: str | None = None) -> dict[str, Any]:
        """Its state as `trial` events and the task view show it; `refine`: its refine job's state (Task)."""
        return {"index": self.index, "state": self.state.value, "metric": self.metric, "attempt": self.attempt,
                "worker": self.worker, "seconds": self.seconds, "error": self.error, "bound": self.bound,
                "stopped_early": self.stopped_early, "interval": self.interval(), "refine": refine,
                "cached": self.cached, **self.deployed(baseline_figures)}

    def interval(self) -> list[float | None] | None:
        """[low, high] of a trial that stopped early (null: unbounded that way), else None."""
        return [self.low, self.high] if self.stopped_early else None

    def deployed(self, baseline_figures: dict | None) -> dict[str, Any]:
        """Its deployment figures, what they say against FP32 (`deploy`: nsd.figures.summary) and where."""
        return {"figures": self.figures, "measured_on": self.measured_on, "pruned": self.pruned,
                "deploy": figures_summary(self.figures, baseline_figures)}


@dataclass
class Task:
    id: str
    spec: TaskSpec  # validated: every field is there, with its default where the submitter gave none
    state: TaskState
    created: float
    owner: str = ""  # its tenant (nsd.tenants; "" without CURVE): who may see it, per-tenant queue limits
    started: float | None = None
    finished: float | None = None
    baseline: float | None = None
    winner: int | None = None
    met_goal: bool | None = None
    error: str | None = None
    seq: int = 0
    jobs: dict[JobRef, Lease] = field(default_factory=dict)  # the jobs other than trials it wants now
    plan_s: float | None = None
    baseline_s: float | None = None  # the baseline job's seconds
    artifact: str | None = None  # blob reference of the saved winner (once verified: handed out)
    candidate: str | None = None  # the saved winner's blob while its verify job runs (not handed out yet)
    saved_by: str | None = None  # the worker that saved it (not persisted): verified elsewhere where possible
    oplists: dict[str, search.OpList] = field(default_factory=dict)  # the plan's ops per config family
    trials: list[Trial] = field(default_factory=list)
    # The running tally (see the module docstring).
    pending: list[int] = field(default_factory=list)  # heap of PENDING indexes (stale entries are skipped)
    n_pending: int = 0
    n_running: int = 0
    n_unfinished: int = 0
    lowest_passed: int | None = None
    cancelled_above: int | None = None  # the lowest pass whose higher trials were already cancelled
    baseline_figures: dict | None = None  # the FP32 model's deployment figures (the baseline's), and where measured
    baseline_on: dict | None = None

    # ---- leases ------------------------------------------------------------------------------

    def lease(self, job: JobRef) -> tuple[int, str | None] | None:
        """(attempt, worker id or None while it waits for one) of the job's current lease; None when the
        job is not running or not wanted (a finished trial, a plan of a task already tuning, ...)."""
        kind = KINDS.get(job.kind)
        if kind is None or self.state not in kind.states:
            return None
        if not kind.in_trial:
            lease = self.jobs.get(job)
            return None if lease is None else (lease.attempt, lease.worker)
        if not isinstance(job.index, int) or not 0 <= job.index < len(self.trials):
            return None
        tr = self.trials[job.index]
        return (tr.attempt, tr.worker) if tr.state is TrialState.RUNNING else None

    def leases(self) -> list[tuple[str, int, str]]:
        """(job id, attempt, worker id) of every job of this task held by a worker now."""
        out = [(ref.id(self.id), lease.attempt, lease.worker) for ref, lease in self.jobs.items() if lease.worker]
        if self.n_running:
            out.extend((JobRef(TRIAL, t.index).id(self.id), t.attempt, t.worker) for t in self.trials
                       if t.state is TrialState.RUNNING and t.worker)
        return out

    def refine_state(self, tr: Trial) -> str | None:
        """Where trial `tr`'s refine stands: waiting, running (a refine job), done, failed, or None."""
        lease = self.jobs.get(JobRef(REFINE.name, tr.index))
        if lease is not None:
            return "running" if lease.worker else "waiting"
        return tr.refine

    def trial_event(self, tr: Trial) -> dict[str, Any]:
        return tr.event(self.baseline_figures, self.refine_state(tr))

    def waiting(self) -> list[JobRef]:
        """Jobs other than trials that wait for a slot, in the order they are placed."""
        return sorted((ref for ref, lease in self.jobs.items() if lease.worker is None),
                      key=lambda ref: (KINDS[ref.kind].order, ref.index or 0))

    def jobs_plain(self) -> list[list]:
        """Task.jobs as the `jobs` column stores it."""
        return [[ref.kind, ref.index, lease.attempt, lease.worker] for ref, lease in self.jobs.items()]

    @staticmethod
    def jobs_from_row(row) -> dict[JobRef, Lease]:
        """Task.jobs from its tasks row; a row from before the `jobs` column kept the lease of its state's job
        (plan or save) in stage_attempt/stage_worker."""
        if row["jobs"] is not None:
            return {JobRef(kind, index): Lease(attempt, worker)
                    for kind, index, attempt, worker in json.loads(row["jobs"])}
        stage = {"queued": PLAN, "planning": PLAN, "finalizing": SAVE}.get(row["state"])
        return {JobRef(stage.name): Lease(row["stage_attempt"], row["stage_worker"])} if stage else {}

    # ---- state changes -------------------------------------------------------------------------

    def move(self, state: TaskState) -> None:
        check_transition(TASK_TRANSITIONS, self.state, state)
        self.state = state

    def index_trials(self) -> None:
        """Rebuild the tally from the trials (after loading them or creating them)."""
        self.pending = sorted(t.index for t in self.trials if t.state is TrialState.PENDING)
        self.n_pending = len(self.pending)
        self.n_running = sum(t.state is TrialState.RUNNING for t in self.trials)
        self.n_unfinished = sum(not t.state.finished for t in self.trials)
        self.lowest_passed = self.objective.passed(self.views())

    @functools.cached_property
    def objective(self) -> Objective:
        """Who wins, what is cancelled, when it is decided (the spec never changes)."""
        return objective_for(self.spec.tuning)

    def stop_rule(self, index: int) -> dict | None:
        """The rule trial `index` runs under: the goal (what passing means, for keeping its model and measuring
        its figures) and whether it may stop early (the objective's stop_rule). `"stop": false` — it runs in
        full — with early stopping off and in the op-wise stage (the search ranks ops by those metrics: stopping
        them would mostly mean refining them). None before the goal is known (it comes as a RULE)."""
        if self.baseline is None:
            return None
        rule = self.objective.stop_rule(self.goal(), [], index)
        if not self.tuning.early_stop or self.trials[index].stage == search.OP_WISE:
            rule["stop"] = False
        return rule

    def may_stop(self, index: int) -> bool:
        rule = self.stop_rule(index)
        return rule is not None and rule.get("stop", True)

    def set_figures(self, tr: Trial, figures: dict | None, on: dict | None) -> None:
        """A trial's deployment figures, and its cost under the objective (weights need the FP32 figures)."""
        tr.figures, tr.measured_on = figures, on
        tr.cost = figures_cost(figures, self.tuning.objective, self.baseline_figures)

    def prune_rule(self) -> dict | None:
        """What a trial's figures must tie before it is evaluated (a figures objective with a passing trial
        measured), for the runner (`nsd.figures.loses`); None: evaluate it."""
        low = getattr(self.objective, "prune", lambda _: None)(
            [] if self.lowest_passed is None else (t.view() for t in self.trials if t.state is TrialState.PASSED))
        if low is None:
            return None
        return {"objective": self.tuning.objective, "best": low, "margin": self.objective.margin,
                "baseline": self.baseline_figures}

    def keeps(self, index: int) -> bool:
        """Whether trial `index` keeps its model should it pass (the objective's keeps)."""
        return self.objective.keeps([] if self.lowest_passed is None else [self.trials[self.lowest_passed].view()],
                                    index)

    def set_state(self, tr: Trial, state: TrialState) -> None:
        old = tr.state
        check_transition(TRIAL_TRANSITIONS, old, state)
        tr.state = state
        if old is state:
            return
        self.n_pending += (state is TrialState.PENDING) - (old is TrialState.PENDING)
        self.n_running += (state is TrialState.RUNNING) - (old is TrialState.RUNNING)
        self.n_unfinished += (not state.finished) - (not old.finished)
        if state is TrialState.PENDING:
            heapq.heappush(self.pending, tr.index)
        if state is TrialState.PASSED and (self.lowest_passed is None or tr.index < self.lowest_passed):
            self.lowest_passed = tr.index

    def dispatchable(self, limit: int) -> int:
        """How many pending trials may start now under the task's `workers` limit (0: none)."""
        return self.n_pending if limit <= 0 else max(0, min(self.n_pending, limit - self.n_running))

    def next_pending(self) -> Trial:
        """The lowest-index pending trial (INC's order)."""
        while True:
            tr = self.trials[heapq.heappop(self.pending)]
            if tr.state is TrialState.PENDING:
                return tr

    def wants_worker(self) -> bool:
        """Whether a job of this task waits for a slot now."""
        if self.state is TaskState.QUEUED or any(lease.worker is None for lease in self.jobs.values()):
            return True
        return self.state is TaskState.TUNING and self.n_pending > 0

    # ---- views -----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tuning(self) -> TuningSpec:
        return self.spec.tuning

    @property
    def resources(self) -> ResourcesSpec:
        return self.spec.resources

    @cached_property
    def spec_dict(self) -> dict[str, Any]:
        """The spec as plain data (what jobs and the task view carry), made once: it does not change."""
        return self.spec.to_dict()

    def views(self) -> list[tuner.TrialView]:
        return [t.view() for t in self.trials]

    def layout(self) -> search.Layout:
        families = tuple(next(iter(t.config)) for t in self.trials if t.stage == search.CONFIG)
        return search.Layout(families, self.oplists, self.tuning.max_trials, self.tuning.higher_is_better,
                             self.tuning.strategy,
                             self.objective)

    def steps(self) -> list[search.Step]:
        return [t.step() for t in self.trials]

    def goal(self) -> tuner.Goal:
        t = self.tuning
        return tuner.Goal(self.baseline, t.tolerable_loss, t.criterion, t.higher_is_better)

    def pareto(self) -> list[int]:
        return pareto_of([{"index": t.index, "metric": t.metric, "figures": t.figures} for t in self.trials
                          if t.figures], self.tuning.objective, self.baseline_figures, self.tuning.higher_is_better)

    def summary(self) -> dict[str, Any]:
        done = len(self.trials) - self.n_unfinished
        return {"task_id": self.id, "name": self.name, "state": self.state.value, "created": self.created,
                "trials_done": done, "trials_total": len(self.trials), "met_goal": self.met_goal,
                "winner": self.winner, "error": self.error}

    def public(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The task as clients see it (STATUS, RESULT): stable, documented in the README. With a `limit`, its
        trials are one page (`trials_page`), so that a task of any size is readable (README "Bounded views")."""
        winner = self.trials[self.winner] if self.winner is not None else None
        t = self.tuning
        now = time.time()
        return {
            "task_id": self.id, "name": self.name, "state": self.state.value, "seq": self.seq,
            "met_goal": self.met_goal, "baseline": self.baseline, "error": self.error,
            "goal": {"tolerable_loss": t.tolerable_loss, "criterion": t.criterion,
                     "higher_is_better": t.higher_is_better, "max_trials": t.max_trials},
            "winner": None if winner is None else {**winner.described(), "metric": winner.metric,
                                                   **winner.deployed(self.baseline_figures)},
            "trials": [tr.public(self.baseline_figures, self.refine_state(tr))
                       for tr in self.trials[offset:None if limit is None else offset + limit]],
            "trials_page": {"offset": offset, "limit": len(self.trials) if limit is None else limit,
                            "total": len(self.trials)},
            "jobs": [{"job": ref.name, "kind": ref.kind, "attempt": lease.attempt, "worker": lease.worker}
                     for ref, lease in self.jobs.items()],
            # Deployment figures (README "JSON output"): FP32's, the objective, and the trials no other beats on
            # both metric and cost (cost: the objective's, or latency under "first").
            "baseline_figures": self.baseline_figures, "baseline_on": self.baseline_on,
            "baseline_deploy": figures_summary(self.baseline_figures, self.baseline_figures),
            "objective": t.objective, "objective_margin": t.objective_margin,
            "pareto": self.pareto(),
            "timings": {"created": self.created, "started": self.started, "finished": self.finished,
                        "elapsed_s": ((self.finished or now) - self.started) if self.started else None,
                        "plan_s": self.plan_s, "baseline_s": self.baseline_s,
                        "trial_s_total": sum(tr.seconds or 0.0 for tr in self.trials)},
            "artifact": self.artifact,
            "spec": self.spec_dict,
        }


@dataclass
class Worker:
    id: str
    identity: bytes
    boot_id: str  # one per worker process: tells a re-registration of the same process from a restart
    host: str
    cores: int
    slots: int
    version: str
    registered: float
    last_seen: float
    key: str | None = None  # its CURVE public key (z85), under CURVE
    trusted: bool = False  # allowed with `--trusted` (any worker without CURVE): its results may be shared
    last_sent: float = 0.0
    cores_per_trial: int = 1  # the shape of its slots, for tasks that leave cores_per_trial to the worker
    running: dict[str, int] = field(default_factory=dict)  # job id -> attempt: the leases it holds
    cores_of: dict[str, int] = field(default_factory=dict)  # job id -> cores that job occupies
    cores_used: int = 0  # sum of cores_of
    freed_at: float | None = None  # when a slot last came free (for the dispatch latency metric)
    draining: bool = False  # finishing what it runs before it leaves; takes nothing new
    congested: bool = False  # an ASSIGN to it found its queue full: takes nothing new until it is heard from
    versions: dict[str, str] | None = None  # nsd/INC/torch versions it runs (the metric cache's key)
    hardware: dict | None = None  # READY's: CPU model, cores, ISA features, label (deployment figures' key)

    @property
    def free_cores(self) -> int:
        if self.draining or self.congested or self.slots <= 0:
            return 0
        return max(0, self.cores - self.cores_used)

    def take(self, job: str, attempt: int, cores: int) -> None:
        self.release(job)
        self.running[job], self.cores_of[job] = attempt, cores
        self.cores_used += cores

    def release(self, job: str) -> int | None:
        """Drop a lease; returns its attempt, or None if it held none."""
        self.cores_used -= self.cores_of.pop(job, 0)
        return self.running.pop(job, None)

    def public(self, now: float) -> dict[str, Any]:
        state = "draining" if self.draining else "busy" if self.running else "idle"
        return {"worker_id": self.id, "host": self.host, "cores": self.cores, "slots": self.slots,
                "busy": len(self.running), "running": sorted(self.running), "version": self.version,
                "state": state, "registered": self.registered, "last_seen_s": round(now - self.last_seen, 3),
                "hardware": self.hardware}
