"""Job kinds, one table: what each kind of job is to the broker — task-level or about one trial, in which
task states it may be wanted, how it is placed, what its result does, what happens when it keeps failing,
and how the metric cache can answer it. Plain data: the handlers are named methods of `Core` (its mixins
`nsd.broker.placement.Placement` and `nsd.broker.outcomes.Outcomes`), looked up by name, so that this
table imports nothing of theirs.

A new kind is one row here, one in `nsd.protocol.JOB_KINDS` (its id on the wire), one in the runner's
dispatch (`nsd.worker.runner.RUNS`), and its handlers. Leases: a trial's lease is the trial's own
(`attempt`, `worker` while it runs: there may be thousands); every other job's is a `Lease` in
`Task.jobs`, present exactly while the task wants that job (see `nsd.broker.model`).
"""

from __future__ import annotations

from dataclasses import dataclass

from nsd.protocol import JOB_KINDS, TRIAL
from nsd.states import TaskState


@dataclass(frozen=True)
class JobKind:
    name: str  # as in nsd.protocol.JOB_KINDS
    per_trial: bool  # about one trial (its index in the job id), else about the whole task
    in_trial: bool  # its lease is the trial's own (attempt, worker while RUNNING), not a Task.jobs entry
    states: frozenset[TaskState]  # the task states in which it may be wanted (Task.lease checks it)
    order: int  # among one task's waiting jobs, lower is placed first; pending trials come after all
    assign: str  # Placement method (task, ref, worker) -> (worker, job body): the ASSIGN it sends
    result: str  # Outcomes method (task, ref, body, worker): what an accepted result does
    give_up: str | None  # Outcomes method (task, ref, attempt, why): its lease was lost max_attempts times
    cached: str | None  # Outcomes method (task, ref, worker) -> bool: answered from the metric cache


PLAN = JobKind("plan", per_trial=False, in_trial=False, states=frozenset({TaskState.QUEUED, TaskState.PLANNING}),
               order=0, assign="_plan_job", result="_plan_result", give_up="_plan_gave_up",
               cached="_plan_from_cache")
BASELINE = JobKind("baseline", per_trial=False, in_trial=False, states=frozenset({TaskState.TUNING}), order=0,
                   assign="_baseline_job", result="_baseline_result", give_up="_baseline_gave_up",
                   cached="_baseline_from_cache")
TRIAL_KIND = JobKind(TRIAL, per_trial=True, in_trial=True, states=frozenset({TaskState.TUNING}), order=100,
                     assign="_trial_job", result="_trial_result", give_up=None, cached="_trials_from_cache")
REFINE = JobKind("refine", per_trial=True, in_trial=False, states=frozenset({TaskState.TUNING}), order=10,
                 assign="_refine_job", result="_refine_result", give_up="_refine_gave_up", cached=None)
SAVE = JobKind("save", per_trial=False, in_trial=False, states=frozenset({TaskState.FINALIZING}), order=0,
               assign="_save_job", result="_save_result", give_up="_save_gave_up", cached="_save_from_cache")

# The winner's saved model, loaded and evaluated again (on another worker where one is free) before it is
# handed out: its metric must be the winner's (nsd.broker.verification).
VERIFY = JobKind("verify", per_trial=False, in_trial=False, states=frozenset({TaskState.FINALIZING}), order=0,
                 assign="_verify_job", result="_verify_result", give_up="_verify_gave_up", cached=None)

KINDS: dict[str, JobKind] = {k.name: k for k in (PLAN, BASELINE, TRIAL_KIND, REFINE, SAVE, VERIFY)}
assert KINDS.keys() == JOB_KINDS.keys() and all(k.per_trial == JOB_KINDS[k.name].per_trial for k in KINDS.values())
