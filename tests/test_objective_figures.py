"""Objectives over deployment figures (`nsd.broker.objective.ByFigures`), pure: run the way the broker runs them
(parallel slots, random finishing order, early stop, trials not evaluated once their figures lose), they give
the answer of a reference that evaluates and measures every trial, on random tables of metrics and costs —
with ties inside the margin going to the earliest trial."""

from __future__ import annotations

import random

import pytest

from nsd.broker.objective import ByFigures, First, objective_for
from nsd.broker.tuner import Decision, Goal, TrialView, meets_goal
from nsd.figures import ties
from nsd.quant.scoring import can_stop
from nsd.states import TrialState as S


def reference(metrics, costs, goal: Goal, margin: float) -> Decision:
    """Every trial evaluated and measured: the earliest passing trial whose cost is within the margin of the
    lowest passing cost; none passing: the best metric, earliest on ties (INC's)."""
    passing = [i for i, m in enumerate(metrics) if m is not None and meets_goal(m, goal)]
    if passing:
        low = min(costs[i] for i in passing)
        return Decision(min(i for i in passing if ties(costs[i], low, margin)), True)
    sign = 1 if goal.higher_is_better else -1
    scored = [i for i, m in enumerate(metrics) if m is not None]
    return Decision(max(scored, key=lambda i: (sign * metrics[i], -i)) if scored else None, False)


def distributed(metrics, costs, goal: Goal, margin: float, slots: int, rng: random.Random, early_stop: bool):
    """What the broker does with the objective: dispatch, prune rules and stop rules at assign time, figures
    with each passing result (or before the evaluation, where a prune rule was given), the decision."""
    objective = ByFigures(goal.higher_is_better, margin)
    views = [TrialView(i, S.PENDING) for i in range(len(metrics))]
    jobs = {}
    while True:
        assert objective.to_cancel(views) == []
        decision = objective.decide(views)
        if decision is not None:
            return decision, views
        running = sum(v.state is S.RUNNING for v in views)
        for i in objective.to_dispatch(views, 0)[: max(0, slots - running)]:
            finished = [v for v in views if v.state.finished]
            jobs[i] = (objective.stop_rule(goal, finished, i) if early_stop else None, objective.prune(finished))
            assert objective.keeps(finished, i)
            views[i] = TrialView(i, S.RUNNING)
        i = rng.choice([v.index for v in views if v.state is S.RUNNING])
        rule, prune = jobs[i]
        m, c = metrics[i], costs[i]
        if prune is not None and not ties(c, prune, margin):
            views[i] = TrialView(i, S.CANCELLED, None, c)  # measured first, lost: not evaluated
        elif m is None:
            views[i] = TrialView(i, S.ERROR)
        elif can_stop(m, m, rule):
            views[i] = TrialView(i, S.FAILED_GOAL)
        elif meets_goal(m, goal):
            views[i] = TrialView(i, S.PASSED, m, c)
        else:
            views[i] = TrialView(i, S.FAILED_GOAL, m)


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_figures_objectives_match_the_reference_on_random_tables(slots):
    rng = random.Random(1700 + slots)
    seen = {"passed": 0, "not_first": 0, "pruned": 0, "tie_to_earlier": 0, "nothing": 0}
    for case in range(800):
        higher = rng.random() < 0.6
        metrics = [None if rng.random() < 0.1 else rng.choice([0.6, 0.8, 0.9, 0.95, 1.0])
                   for _ in range(rng.randint(1, 9))]
        costs = [rng.choice([10.0, 10.3, 12.0, 20.0, rng.uniform(5, 30)]) for _ in metrics]
        if not higher:
            metrics = [None if m is None else 2 - m for m in metrics]
        goal = Goal(1.0, rng.choice([0.0, 0.05, 0.15]), "relative", higher)
        margin = rng.choice([0.0, 0.05, 0.2])
        expected = reference(metrics, costs, goal, margin)
        decision, views = distributed(metrics, costs, goal, margin, slots, random.Random(case), rng.random() < 0.7)
        assert decision == expected, (case, metrics, costs, goal, margin)
        first = First(higher).decide([TrialView(i, S.PASSED if m is not None and meets_goal(m, goal) else
                                                S.FAILED_GOAL, m) for i, m in enumerate(metrics)])
        seen["passed"] += expected.met_goal
        seen["not_first"] += expected.met_goal and expected.winner != first.winner
        seen["nothing"] += expected.winner is not None and not expected.met_goal
        seen["pruned"] += any(v.state is S.CANCELLED for v in views)
        if expected.met_goal:
            passing = [i for i, m in enumerate(metrics) if m is not None and meets_goal(m, goal)]
            low = min(costs[i] for i in passing)
            seen["tie_to_earlier"] += costs[expected.winner] > low
    assert min(seen.values()) > 5, seen  # the tables covered every case


def test_objective_for_reads_the_spec():
    assert objective_for({"objective": "first"}) == First(True)
    assert objective_for({"objective": "latency", "objective_margin": 0.1, "higher_is_better": False}) == \
        ByFigures(False, 0.1)
    assert isinstance(objective_for({"objective": {"latency": 0.7, "size": 0.3}}), ByFigures)


def test_a_passing_trial_without_figures_ranks_after_measured_ones():
    objective = ByFigures(True, 0.05)
    views = [TrialView(0, S.PASSED, 1.0, None), TrialView(1, S.PASSED, 1.0, 20.0), TrialView(2, S.PASSED, 1.0, 10.0)]
    assert objective.decide(views) == Decision(2, True)
    assert objective.decide(views[:1]) == Decision(0, True)
    assert objective.decide([*views, TrialView(3, S.RUNNING)]) is None  # a later trial may cost less
    assert objective.decide([*views, TrialView(3, S.RUNNING)], exhausted=True) == Decision(2, True)
    assert objective.prune(views) == 10.0 and objective.prune(views[:1]) is None
