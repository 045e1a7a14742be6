"""The tuning objective: which trial wins, what may be cancelled, when the answer is decided, and what a
running trial must reach to matter (its early-stop rule) — pure, over plain trial views. `tuner`'s goal
arithmetic, the fallback `search` and the broker's `Task` all ask the task's objective; nothing else
knows the winner rule.

`First` is INC 3.x `autotune`'s rule, made safe for parallel trials: INC runs configs in order and stops
at the first one whose metric meets the goal, so the answer is the *lowest-index* passing trial — known as
soon as it has passed and every trial below it has finished. If none passes, INC keeps the best metric,
earliest on ties (a stable sort in `TuningMonitor.get_best_trial_record`).

An objective's methods take a sequence of `TrialView`s. Where a method needs only a few of them (the
best, the lowest passing one), the broker passes just those from its running tally (`nsd.broker.model.Task`)
instead of every trial; the docstrings say which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, Protocol, Sequence

from nsd.broker.tuner import Decision, Goal, TrialView, goal_threshold
from nsd.spec import TuningSpec
from nsd.states import TrialState

OBJECTIVES = ("first", "latency", "throughput", "memory", "size")  # and weights over the last four (nsd.spec)


class Objective(Protocol):
    """What every objective answers (First is the reference; issue 17 adds others on this seam)."""
    name: ClassVar[str]
    higher_is_better: bool
    speculates: ClassVar[bool]

    def passed(self, trials: Iterable[TrialView]) -> int | None: ...
    def best(self, trials: Iterable[TrialView]) -> int | None: ...
    def decide(self, trials: Sequence[TrialView], exhausted: bool = False) -> Decision | None: ...
    def to_cancel(self, trials: Sequence[TrialView]) -> list[int]: ...
    def to_dispatch(self, trials: Sequence[TrialView], limit: int) -> list[int]: ...
    def keeps(self, trials: Iterable[TrialView], index: int) -> bool: ...
    def stop_rule(self, goal: Goal, trials: Sequence[TrialView], index: int) -> dict: ...


@dataclass(frozen=True)
class First:
    """INC's objective: the lowest-index passing trial wins; with none passing, the best metric (earliest)."""
    higher_is_better: bool = True
    name: ClassVar[str] = "first"
    speculates: ClassVar[bool] = True  # the search may add a stage before the one before it has finished

    @property
    def sign(self) -> int:
        return 1 if self.higher_is_better else -1

    def passed(self, trials: Iterable[TrialView]) -> int | None:
        """The lowest passing trial."""
        return min((t.index for t in trials if t.state is TrialState.PASSED), default=None)

    def best(self, trials: Iterable[TrialView]) -> int | None:
        """The best metric among finished trials, earliest index on ties."""
        scored = sorted((t for t in trials if t.metric is not None and math.isfinite(t.metric)
                         and t.state in (TrialState.PASSED, TrialState.FAILED_GOAL)), key=lambda t: t.index)
        return max(scored, key=lambda t: self.sign * t.metric).index if scored else None  # max keeps the first

    def decide(self, trials: Sequence[TrialView], exhausted: bool = False) -> Decision | None:
        """The task's outcome, or None while it is not yet known. `exhausted` (the wall-clock budget ran out)
        settles for what has finished: the lowest passing trial if any, else the best so far."""
        passed = self.passed(trials)
        if passed is not None and (exhausted or all(t.state.finished for t in trials if t.index < passed)):
            return Decision(passed, True)
        if not exhausted and any(not t.state.finished for t in trials):
            return None
        return Decision(self.best(trials), False)

    def to_cancel(self, trials: Sequence[TrialView]) -> list[int]:
        """Unfinished trials above the lowest passing one: they can no longer win."""
        passed = self.passed(trials)
        if passed is None:
            return []
        return [t.index for t in trials if t.index > passed and not t.state.finished]

    def to_dispatch(self, trials: Sequence[TrialView], limit: int) -> list[int]:
        """Pending trials to start now, lowest index first, keeping at most `limit` running (0: no limit)."""
        passed = self.passed(trials)
        pending = sorted(t.index for t in trials if t.state is TrialState.PENDING
                         and (passed is None or t.index < passed))
        if limit <= 0:
            return pending
        running = sum(t.state is TrialState.RUNNING for t in trials)
        return pending[: max(0, limit - running)]

    def keeps(self, trials: Iterable[TrialView], index: int) -> bool:
        """Whether trial `index`, should it pass, may win (then its worker keeps its model for the save job).
        `trials` may be just the lowest passing one."""
        passed = self.passed(trials)
        return passed is None or passed > index

    def stop_rule(self, goal: Goal, trials: Sequence[TrialView], index: int) -> dict:
        """What trial `index` must reach to matter, for the runner's early stop (`nsd.quant.scoring.can_stop`).
        `trials` may be just the best finished one.

        A trial matters if it can meet the goal (then it may win) or become `best` (the winner when none
        passes). Its evaluation may stop once its best reachable metric can do neither: below the goal and
        worse than a finished trial's metric — or equal to it where that trial has a lower index, since
        `best` keeps the earliest on ties. Finished metrics never change and only add up, so a rule made at
        assign time stays valid however long the trial runs. `best` is None while no trial has a metric:
        the trial might become the best one, and runs in full. Signed space: larger is better for both."""
        top = self.best(trials)
        rule = {"sign": self.sign, "need": goal_threshold(goal), "best": None, "tie_stops": False}
        if top is not None:
            metric = next(t.metric for t in trials if t.index == top)
            rule.update(best=self.sign * metric, tie_stops=top < index)
        return rule


@dataclass(frozen=True)
class ByFigures(First):
    """`tuning.objective` other than "first" (issue 17): among the trials that meet the goal, the one with the
    lowest cost by its deployment figures (`TrialView.cost`, from `nsd.figures.cost`) wins; costs within
    `margin` of the lowest tie, and ties go to the earliest trial, so the answer is reproducible. A passing
    trial without figures ranks after every measured one (the earliest of them wins if none was measured).

    Nothing passing is First's answer (the best metric, earliest on ties), and so is the early-stop rule: a
    trial that can neither meet the goal nor become the best has nothing to win. What differs: the answer
    waits for every trial (a later one may be cheaper), nothing is cancelled by a pass, every passing trial
    keeps its model, and a trial whose figures already lose is not evaluated (`prune`, on the trial job)."""
    margin: float = 0.05
    name: ClassVar[str] = "figures"
    speculates: ClassVar[bool] = False  # a speculative trial could win on cost: stages follow each other

    def winner(self, trials: Iterable[TrialView]) -> int | None:
        """The earliest passing trial whose cost ties the lowest passing cost."""
        passing = [t for t in trials if t.state is TrialState.PASSED]
        costed = [t for t in passing if t.cost is not None]
        if not costed:
            return min((t.index for t in passing), default=None)
        low = min(t.cost for t in costed)
        return min(t.index for t in costed if ties(t.cost, low, self.margin))

    def decide(self, trials: Sequence[TrialView], exhausted: bool = False) -> Decision | None:
        """Once every trial has finished (or the budget ran out: over what has): the winner among the passing
        ones, else the best metric with met_goal false."""
        if not exhausted and any(not t.state.finished for t in trials):
            return None
        won = self.winner(trials)
        return Decision(won, True) if won is not None else Decision(self.best(trials), False)

    def to_cancel(self, trials: Sequence[TrialView]) -> list[int]:
        return []  # a pass decides nothing about the others: any of them may cost less

    def to_dispatch(self, trials: Sequence[TrialView], limit: int) -> list[int]:
        pending = sorted(t.index for t in trials if t.state is TrialState.PENDING)
        if limit <= 0:
            return pending
        running = sum(t.state is TrialState.RUNNING for t in trials)
        return pending[: max(0, limit - running)]

    def keeps(self, trials: Iterable[TrialView], index: int) -> bool:
        return True  # any passing trial may win

    def prune(self, trials: Iterable[TrialView]) -> float | None:
        """The cost a trial's figures must tie to matter (the lowest passing cost; None: nothing to beat). A
        trial beyond its margin cannot win whatever its metric (costs only fall as trials pass), so the
        runner need not evaluate it (`nsd.figures.loses`)."""
        costs = [t.cost for t in trials if t.state is TrialState.PASSED and t.cost is not None]
        return min(costs, default=None)


def ties(cost: float, low: float, margin: float) -> bool:
    """nsd.figures.ties, for costs (non-negative): within the margin of the lowest."""
    return cost <= low * (1 + margin)


def objective_for(tuning: TuningSpec) -> Objective:
    """A task's objective from its (validated) tuning section."""
    if tuning.objective in ("first", None):
        return First(tuning.higher_is_better)
    return ByFigures(tuning.higher_is_better, float(tuning.objective_margin))
