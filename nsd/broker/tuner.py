"""The goal and the plain data decisions are made over, as pure functions: a trial as the decisions see
it, whether a metric meets the goal (INC's arithmetic), and what a lost lease does. Which trial wins, what
to cancel and when the task is decided is the task's objective (`nsd.broker.objective`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    cost: float | None = None  # under a figures objective: its cost (nsd.figures.cost), lower is better


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


def after_lost_lease(attempt: int, max_attempts: int) -> tuple[TrialState, int]:
    """A running trial whose worker or runner died: try again, or give it up as a poison config."""
    if attempt >= max_attempts:
        return TrialState.ERROR, attempt
    return TrialState.PENDING, attempt + 1
