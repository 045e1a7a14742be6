"""The objective seam, pure: First's rules, run the way the broker runs them (parallel slots, random finishing
order, cancellations, early stop by its rule with intervals, refines where a decision needs a full metric),
give INC's sequential answer — winner and its full metric — on random metric tables."""

from __future__ import annotations

import random

import pytest

from nsd.broker.objective import First, objective_for
from nsd.broker.tuner import Decision, Goal, TrialView, meets_goal
from nsd.quant.scoring import can_stop
from nsd.spec import TuningSpec
from nsd.states import TrialState as S
from tests.peers import random_interval


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
                early_stop: bool, values: list[float]):
    """What the broker does with the objective: dispatch, stop rules (a trial that cannot meet the goal stops
    with an interval), cancellations, refines of stopped trials where the decision needs them, decision."""
    objective = First(goal.higher_is_better)
    views = [TrialView(i, S.PENDING) for i in range(len(metrics))]
    rules, keeps, refining, refined = {}, {}, set(), set()
    while True:
        for i in objective.to_cancel(views):
            views[i] = TrialView(i, S.CANCELLED)
        decision = objective.decide(views)
        if decision is not None:
            return decision, views, keeps, refined
        refining |= objective.refine(views) - refined
        running = sum(v.state is S.RUNNING for v in views) + len(refining)
        for i in objective.to_dispatch(views, limit)[: max(0, slots - running)]:
            rules[i] = objective.stop_rule(goal, [], i) if early_stop else None
            keeps[i] = objective.keeps([v for v in views if v.state.finished], i)
            views[i] = TrialView(i, S.RUNNING)
        i = rng.choice([v.index for v in views if v.state is S.RUNNING] + sorted(refining))
        m = metrics[i]
        if i in refining:  # its refine job: the full metric, same state
            refining.discard(i)
            refined.add(i)
            views[i] = TrialView(i, views[i].state, m, low=views[i].low, high=views[i].high)
        elif m is None:
            views[i] = TrialView(i, S.ERROR)
        elif can_stop(m, m, rules[i]) and rng.random() < 0.8:  # it stopped early: an interval, no metric
            views[i] = TrialView(i, S.FAILED_GOAL, None, **dict(zip(("low", "high"),
                                                                       random_interval(m, goal, rng, values))))
        else:
            views[i] = TrialView(i, S.PASSED if meets_goal(m, goal) else S.FAILED_GOAL, m)


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_first_gives_incs_answer_on_random_tables(slots):
    rng = random.Random(500 + slots)
    seen = {"passed": 0, "nothing": 0, "stopped": 0, "refined": 0, "spared": 0}
    for case in range(600):
        higher = rng.random() < 0.6
        values = rng.sample([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], rng.randint(1, 4))
        metrics = [None if rng.random() < 0.1 else rng.choice(values) for _ in range(rng.randint(1, 9))]
        goal = Goal(rng.choice([0.7, 0.8, 0.9, 1.1]), rng.choice([0.0, 0.05]), rng.choice(["relative", "absolute"]),
                    higher)
        winner, met = sequential(metrics, goal)
        limit = rng.choice([0, 0, 1, 2])
        decision, views, keeps, refined = distributed(metrics, goal, slots, limit, random.Random(case),
                                                      rng.random() < 0.7, values)
        assert decision == Decision(winner, met), (case, metrics, goal)
        if winner is not None:
            assert views[winner].metric == metrics[winner]  # the winner's metric is its full one
        if met:
            assert keeps[winner]  # the winner was told to keep its model
            assert not refined  # with a pass, no full metric of a stopped trial is ever needed
        stopped = [v for v in views if v.low is not None or v.high is not None]
        seen["passed"] += met
        seen["nothing"] += winner is not None and not met
        seen["stopped"] += len(stopped)
        seen["refined"] += len(refined)
        seen["spared"] += not met and len(refined) < len(stopped)  # intervals decided some without a refine
    assert min(seen.values()) > 20  # the tables covered passes, nothing passing, stops, refines and spares


def test_objective_for_a_task_follows_its_direction():
    assert objective_for(TuningSpec(higher_is_better=False)) == First(False)
    assert objective_for(TuningSpec()).name == "first"
    lower = First(False)
    views = [TrialView(0, S.FAILED_GOAL, 3.0), TrialView(1, S.FAILED_GOAL, 2.0), TrialView(2, S.FAILED_GOAL, 2.0)]
    assert lower.best(views) == 1 and First(True).best(views) == 0
    assert lower.decide(views) == Decision(1, False)
    assert First().keeps([TrialView(3, S.PASSED, 1.0)], 2) and not First().keeps([TrialView(3, S.PASSED, 1.0)], 4)


def test_intervals_decide_where_they_separate_and_name_what_to_refine():
    from nsd.broker import intervals as iv

    inf = float("inf")
    exact = lambda v: (v, v)  # noqa: E731
    # the best: a full 0.8 beats [0.1, 0.7]; [0.5, 0.9] might beat it: refine that one only
    assert iv.top([exact(0.8), (0.1, 0.7), None]) == (0, frozenset())
    assert iv.top([exact(0.8), (0.1, 0.7), (0.5, 0.9)]) == (None, frozenset({2}))
    # ties go to the earlier position: a later interval that can only tie is out, an earlier one is not
    assert iv.top([exact(0.8), (0.1, 0.8)]) == (0, frozenset())
    assert iv.top([(0.1, 0.8), exact(0.8)]) == (None, frozenset({0}))
    assert iv.top([None, None]) == (None, frozenset())
    # lower is better: spans are signed (sign * metric), so perplexity 9 beats [10, unbounded)
    assert iv.span(9.0, None, None, -1) == (-9.0, -9.0) and iv.span(None, 10.0, None, -1) == (-inf, -10.0)
    # an order: only what decides its first r positions is refined; no metric sorts last
    spans = [exact(0.5), (0.6, 0.7), exact(0.9), (0.55, 0.65), None]
    assert iv.ranked(spans, 1) == ([2], frozenset())
    assert iv.ranked(spans, 2) == (None, frozenset({1, 3}))
    assert iv.ranked([exact(0.5), (0.6, 0.7), exact(0.9), exact(0.65), None], 5) == (None, frozenset({1}))
    assert iv.ranked([exact(0.5), (0.66, 0.7), exact(0.9), exact(0.65), None], 5) == ([2, 1, 3, 0, 4], frozenset())
    # a stopped trial's fields, checked: its bound is the interval's best end
    assert iv.stop_interval({"bound": 0.7, "low": 0.1, "high": 0.7}, 1) == (0.7, 0.1, 0.7)
    assert iv.stop_interval({"bound": 0.7}, 1) == (0.7, None, 0.7)  # from before intervals: one end
    assert iv.stop_interval({"bound": 0.7, "low": 0.9, "high": 0.7}, 1) is None
    assert iv.stop_interval({"bound": 0.1, "low": 0.1, "high": 0.7}, 1) is None
    assert iv.stop_interval({"bound": float("nan")}, 1) is None
