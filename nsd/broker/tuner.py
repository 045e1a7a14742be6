"""The tuning decisions, as pure functions over plain data: which trials run next, which to cancel,
who won, when the task is over. The broker's loop only applies what these return.

The rule is INC 3.x `autotune`'s, made safe for parallel trials: INC runs configs in order and stops at
the first one whose metric meets the goal, so the answer is the *lowest-index* passing trial — which
is known as soon as it has passed and every trial below it has finished. If none passes, INC keeps the
best metric, earliest on ties (a stable sort in `TuningMonitor.get_best_trial_record`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from nsd.states import TrialState


@dataclass(frozen=True)
class Goal:
    baseline: float
    tolerable_loss: float
    criterion: str = "relative"  # or "absolute"
    higher_is_better: bool = True


@dataclass(frozen=True)
class TrialView:
    index: int
    state: TrialState
    metric: float | None = None


@dataclass(frozen=True)
class Decision:
    winner: int | None  # None: nothing produced a metric
    met_goal: bool


def goal_threshold(goal: Goal) -> float:
    """The goal in signed space: a metric m meets it iff sign * m >= this (sign = -1 for lower-is-better)."""
    sign = 1 if goal.higher_is_better else -1
    if goal.criterion == "relative":
        return sign * goal.baseline * (1 - sign * goal.tolerable_loss)
    return sign * goal.baseline - goal.tolerable_loss


def meets_goal(metric: float, goal: Goal) -> bool:
    """INC's test for relative/higher-is-better (`TuningMonitor.need_stop`), mirrored for the rest."""
    if not math.isfinite(metric):
        return False
    sign = 1 if goal.higher_is_better else -1
    return sign * metric >= goal_threshold(goal)


def stop_rule(goal: Goal, trials: Sequence[TrialView], index: int) -> dict:
    """What trial `index` must reach to matter, for the runner's early stop (`nsd.quant.scoring.can_stop`).

    A trial matters if it can meet the goal (then it may win) or become `best` (the winner when none
    passes). Its evaluation may stop once its best reachable metric can do neither: below the goal and
    worse than a finished trial's metric — or equal to it where that trial has a lower index, since `best`
    keeps the earliest on ties. Finished metrics never change and only add up, so a rule made at assign
    time stays valid however long the trial runs. `best` is None while no trial has a metric: the trial
    might become the best one, and runs in full. Signed space: larger is better for both directions."""
    sign = 1 if goal.higher_is_better else -1
    top = best(trials, goal.higher_is_better)
    rule = {"sign": sign, "need": goal_threshold(goal), "best": None, "tie_stops": False}
    if top is not None:
        metric = next(t.metric for t in trials if t.index == top)
        rule.update(best=sign * metric, tie_stops=top < index)
    return rule


def first_passed(trials: Iterable[TrialView]) -> int | None:
    return min((t.index for t in trials if t.state is TrialState.PASSED), default=None)


def to_cancel(trials: Sequence[TrialView]) -> list[int]:
    """Unfinished trials above the lowest passing one: they can no longer win."""
    passed = first_passed(trials)
    if passed is None:
        return []
    return [t.index for t in trials if t.index > passed and not t.state.finished]


def to_dispatch(trials: Sequence[TrialView], limit: int) -> list[int]:
    """Pending trials to start now, lowest index first, keeping at most `limit` running (0: no limit)."""
    passed = first_passed(trials)
    pending = sorted(t.index for t in trials if t.state is TrialState.PENDING
                     and (passed is None or t.index < passed))
    if limit <= 0:
        return pending
    running = sum(t.state is TrialState.RUNNING for t in trials)
    return pending[: max(0, limit - running)]


def best(trials: Iterable[TrialView], higher_is_better: bool) -> int | None:
    """The best metric among finished trials, earliest index on ties."""
    scored = sorted((t for t in trials if t.metric is not None and math.isfinite(t.metric)
                     and t.state in (TrialState.PASSED, TrialState.FAILED_GOAL)), key=lambda t: t.index)
    sign = 1 if higher_is_better else -1
    return max(scored, key=lambda t: sign * t.metric).index if scored else None  # max keeps the first


def decide(trials: Sequence[TrialView], higher_is_better: bool, exhausted: bool = False) -> Decision | None:
    """The task's outcome, or None while it is not yet known.

    `exhausted` (the wall-clock budget ran out) settles for what has finished: the lowest passing
    trial if any, else the best so far.
    """
    passed = first_passed(trials)
    if passed is not None and (exhausted or all(t.state.finished for t in trials if t.index < passed)):
        return Decision(passed, True)
    if not exhausted and any(not t.state.finished for t in trials):
        return None
    return Decision(best(trials, higher_is_better), False)


def after_lost_lease(attempt: int, max_attempts: int) -> tuple[TrialState, int]:
    """A running trial whose worker or runner died: try again, or give it up as a poison config."""
    if attempt >= max_attempts:
        return TrialState.ERROR, attempt
    return TrialState.PENDING, attempt + 1
