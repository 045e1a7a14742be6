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
    from nsd.spec import TuningSpec

    assert objective_for(TuningSpec(objective="first")) == First(True)
    assert objective_for(TuningSpec(objective="latency", objective_margin=0.1, higher_is_better=False)) == \
        ByFigures(False, 0.1)
    assert isinstance(objective_for(TuningSpec(objective={"latency": 0.7, "size": 0.3})), ByFigures)


def test_a_passing_trial_without_figures_ranks_after_measured_ones():
    objective = ByFigures(True, 0.05)
    views = [TrialView(0, S.PASSED, 1.0, None), TrialView(1, S.PASSED, 1.0, 20.0), TrialView(2, S.PASSED, 1.0, 10.0)]
    assert objective.decide(views) == Decision(2, True)
    assert objective.decide(views[:1]) == Decision(0, True)
    assert objective.decide([*views, TrialView(3, S.RUNNING)]) is None  # a later trial may cost less
    assert objective.decide([*views, TrialView(3, S.RUNNING)], exhausted=True) == Decision(2, True)
    assert objective.prune(views) == 10.0 and objective.prune(views[:1]) is None


# ---- with the fallback search: the candidates are the passing trials of the first stage group that has any ----

def _case(rng: random.Random):
    from nsd.broker.search import Layout, OpList

    n_ops = rng.choice([0, 1, 2, 3, 5])
    ops = tuple(f"layer.{i // 2}.op{i % 2}" if i < n_ops - 1 else "head" for i in range(n_ops))
    blocks = tuple(b for b in (tuple(o for o in ops if o.startswith(f"layer.{k}.")) for k in range((n_ops - 1) // 2))
                   if len(b) >= 2) if rng.random() < 0.5 else ()
    families = tuple(rng.choice(["rtn", "static_quant"]) for _ in range(rng.randint(1, 3)))
    total = len(families) + len(blocks) + n_ops + max(0, n_ops - 1)
    margin = rng.choice([0.0, 0.05, 0.3])
    layout = Layout(families, {"rtn": OpList(ops, blocks), "static_quant": OpList(ops)},
                    max_trials=rng.randint(1, total + 2), objective=ByFigures(True, margin))
    seed = rng.randrange(1 << 30)

    def measure(base: int, fallback: tuple) -> tuple[float | None, float]:
        h = random.Random(f"{seed}|{base}|{sorted(fallback)}")
        metric = None if h.random() < 0.05 else h.choice([0.5, 0.7, 0.9, 0.95, 1.0])
        return metric, h.choice([10.0, 10.2, 15.0, 30.0])  # deterministic per trial, as INC's metrics are

    return layout, measure, Goal(1.0, rng.choice([0.05, 0.2]), "relative", True), margin


def grouped_reference(layout, measure, goal: Goal, margin: float) -> tuple[int | None, bool]:
    """Sequentially, stage group by stage group: the config set; then block-wise and op-wise; then accumulated
    — each group run whole (cut at max_trials); the first group with a passing trial is ranked by cost."""
    from nsd.broker.search import accumulated_stage, best_config, block_stage, impact_order, op_stage

    run: list[tuple[int, tuple, float | None, float]] = []  # (base, fallback, metric, cost)

    def group(trials) -> Decision | None:
        start = len(run)
        for base, fallback in trials[: layout.max_trials - len(run)]:
            run.append((base, fallback, *measure(base, fallback)))
        passing = [i for i in range(start, len(run)) if run[i][2] is not None and meets_goal(run[i][2], goal)]
        if not passing:
            return None
        low = min(run[i][3] for i in passing)
        return Decision(min(i for i in passing if ties(run[i][3], low, margin)), True)

    found = group([(i, ()) for i in range(len(layout.families))])
    base = best_config([m for _, _, m, _ in run], True) if found is None else None
    if found is None and base is not None:
        oplist = layout.oplists[layout.families[base]]
        n_configs, n_blocks = len(run), len(block_stage(oplist))
        found = group([(base, fb) for fb in block_stage(oplist) + op_stage(oplist)])
        op_wise = run[n_configs + n_blocks:]
        if found is None and oplist.ops and len(op_wise) == len(oplist.ops):  # not cut by max_trials
            order = impact_order([(fb[0], m) for _, fb, m, _ in op_wise], True)
            found = group([(base, fb) for fb in accumulated_stage(order)])
    if found is not None:
        return found.winner, True
    scored = [i for i, (_, _, m, _) in enumerate(run) if m is not None]
    return (max(scored, key=lambda i: (run[i][2], -i)) if scored else None), False


@pytest.mark.parametrize("slots", [3, 20])
def test_figures_objectives_through_the_fallback_search_match_the_grouped_reference(slots):
    from nsd.broker.search import CONFIG, Step, decide, next_stage

    rng = random.Random(2024 + slots)
    seen = {"config": 0, "fallback": 0, "nothing": 0}
    for case in range(600):
        layout, measure, goal, margin = _case(rng)
        expected = grouped_reference(layout, measure, goal, margin)
        order = random.Random(case)
        steps = [Step(i, CONFIG, (), i) for i in range(min(len(layout.families), layout.max_trials))]
        while True:
            steps += [Step(len(steps) + k, n.stage, n.fallback, n.base) for k, n in enumerate(next_stage(layout, steps))]
            if all(s.state.finished for s in steps):
                break
            assert decide(layout, steps) is None
            for s in [s for s in steps if s.state is S.PENDING][:slots - sum(s.state is S.RUNNING for s in steps)]:
                steps[s.index] = Step(s.index, s.stage, s.fallback, s.base, S.RUNNING)
            done = order.choice([s for s in steps if s.state is S.RUNNING])
            metric, c = measure(done.base, done.fallback)
            state = S.ERROR if metric is None else S.PASSED if meets_goal(metric, goal) else S.FAILED_GOAL
            steps[done.index] = Step(done.index, done.stage, done.fallback, done.base, state, metric,
                                     c if state is S.PASSED else None)
        decision = decide(layout, steps)
        assert (decision.winner, decision.met_goal) == expected, (case, steps)
        if expected[1]:
            seen["config" if steps[expected[0]].stage == CONFIG else "fallback"] += 1
        else:
            seen["nothing"] += expected[0] is not None
    assert min(seen.values()) > 20, seen


def test_no_speculative_stage_under_a_figures_objective():
    """With the block-wise trial still running and every op-wise trial failed, First adds the accumulated stage
    at once (a trial there can only win if everything below it fails); under a figures objective it waits:
    an accumulated trial could otherwise win on cost over the block-wise one, depending on who finished first."""
    from nsd.broker.search import BLOCK_WISE, CONFIG, OP_WISE, Layout, OpList, Step, next_stage

    ops = OpList(("l.0.a", "l.0.b", "head"), (("l.0.a", "l.0.b"),))
    steps = [Step(0, CONFIG, (), 0, S.FAILED_GOAL, 0.5), Step(1, BLOCK_WISE, ("l.0.a", "l.0.b"), 0, S.RUNNING),
             Step(2, OP_WISE, ("head",), 0, S.FAILED_GOAL, 0.6), Step(3, OP_WISE, ("l.0.b",), 0, S.FAILED_GOAL, 0.7),
             Step(4, OP_WISE, ("l.0.a",), 0, S.FAILED_GOAL, 0.6)]
    assert len(next_stage(Layout(("rtn",), {"rtn": ops}), steps)) == 2
    by_figures = Layout(("rtn",), {"rtn": ops}, objective=ByFigures(True, 0.05))
    assert next_stage(by_figures, steps) == []
    steps[1] = Step(1, BLOCK_WISE, ("l.0.a", "l.0.b"), 0, S.FAILED_GOAL, 0.8)
    assert [n.fallback for n in next_stage(by_figures, steps)] == [("l.0.b", "head"), ("l.0.b", "head", "l.0.a")]
