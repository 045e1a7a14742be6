"""The objective seam, pure: First's rules, run the way the broker runs them (parallel slots, random finishing
order, cancellations, early stop by its rule), give INC's sequential answer on random metric tables."""

from __future__ import annotations

import random

import pytest

from nsd.broker.objective import First, objective_for
from nsd.spec import TuningSpec
from nsd.broker.tuner import Decision, Goal, TrialView, meets_goal
from nsd.quant.scoring import can_stop
from nsd.states import TrialState as S


def sequential(metrics: list[float | None], goal: Goal) -> tuple[int | None, bool]:
    """INC's autotune: the first passing trial in order; else the best metric, earliest on ties."""
    sign = 1 if goal.higher_is_better else -1
    best = None
    for i, m in enumerate(metrics):
        if m is None:
            continue
        if meets_goal(m, goal):
            return i, True
        if best is None or sign * m > sign * metrics[best]:
            best = i
    return best, False


def distributed(metrics: list[float | None], goal: Goal, slots: int, limit: int, rng: random.Random,
                early_stop: bool):
    """What the broker does with the objective: dispatch, stop rules, cancellations, decision."""
    objective = First(goal.higher_is_better)
    views = [TrialView(i, S.PENDING) for i in range(len(metrics))]
    rules, keeps = {}, {}
    while True:
        for i in objective.to_cancel(views):
            views[i] = TrialView(i, S.CANCELLED)
        decision = objective.decide(views)
        if decision is not None:
            return decision, views, keeps
        running = sum(v.state is S.RUNNING for v in views)
        for i in objective.to_dispatch(views, limit)[: max(0, slots - running)]:
            finished = [v for v in views if v.state.finished]
            rules[i] = objective.stop_rule(goal, finished, i) if early_stop else None
            keeps[i] = objective.keeps(finished, i)
            views[i] = TrialView(i, S.RUNNING)
        i = rng.choice([v.index for v in views if v.state is S.RUNNING])
        m = metrics[i]
        if m is None:
            views[i] = TrialView(i, S.ERROR)
        elif can_stop(m, m, rules[i]):  # it stopped early: no metric
            views[i] = TrialView(i, S.FAILED_GOAL)
        else:
            views[i] = TrialView(i, S.PASSED if meets_goal(m, goal) else S.FAILED_GOAL, m)


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_first_gives_incs_answer_on_random_tables(slots):
    rng = random.Random(500 + slots)
    seen = {"passed": 0, "nothing": 0, "stopped": 0}
    for case in range(600):
        higher = rng.random() < 0.6
        values = rng.sample([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], rng.randint(1, 4))
        metrics = [None if rng.random() < 0.1 else rng.choice(values) for _ in range(rng.randint(1, 9))]
        goal = Goal(rng.choice([0.7, 0.8, 0.9, 1.1]), rng.choice([0.0, 0.05]), rng.choice(["relative", "absolute"]),
                    higher)
        winner, met = sequential(metrics, goal)
        limit = rng.choice([0, 0, 1, 2])
        decision, views, keeps = distributed(metrics, goal, slots, limit, random.Random(case), rng.random() < 0.7)
        assert decision == Decision(winner, met), (case, metrics, goal)
        if winner is not None:
            assert views[winner].metric == metrics[winner]  # the winner's metric is its full one
        if met:
            assert keeps[winner]  # the winner was told to keep its model
        seen["passed"] += met
        seen["nothing"] += winner is not None and not met
        seen["stopped"] += sum(v.state is S.FAILED_GOAL and v.metric is None for v in views)
    assert min(seen.values()) > 20  # the tables covered passes, nothing passing, and early stops


def test_objective_for_a_task_follows_its_direction():
    assert objective_for(TuningSpec(higher_is_better=False)) == First(False)
    assert objective_for(TuningSpec()).name == "first"
    lower = First(False)
    views = [TrialView(0, S.FAILED_GOAL, 3.0), TrialView(1, S.FAILED_GOAL, 2.0), TrialView(2, S.FAILED_GOAL, 2.0)]
    assert lower.best(views) == 1 and First(True).best(views) == 0
    assert lower.decide(views) == Decision(1, False)
    assert First().keeps([TrialView(3, S.PASSED, 1.0)], 2) and not First().keeps([TrialView(3, S.PASSED, 1.0)], 4)
