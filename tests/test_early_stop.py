"""Early stopping, lazily exact: a trial stops evaluating once it cannot meet the goal, and a full metric is
computed later (a refine job) only where the answer needs it; the answer (winner, its metric, best) is the
one a full evaluation gives."""

from __future__ import annotations

import math
import os
import random

import pytest

from nsd.broker import tuner
from nsd.broker.objective import First
from nsd.broker.tuner import Goal
from nsd.quant import scoring
from tests.conftest import RECIPES, digits_spec
from tests.peers import assert_same_answer_on_off, steps_then_metric, tune_on_and_off

os.environ.setdefault("LOGLEVEL", "WARNING")

def stop_rule(goal: Goal, trials, index: int) -> dict:
    return First(goal.higher_is_better).stop_rule(goal, trials, index)


# ------------------------------------------------------------------------------------------------ pure

def test_a_trial_stops_once_it_cannot_meet_the_goal():
    goal = Goal(baseline=0.9, tolerable_loss=0.1)  # meets at >= 0.81
    rule = stop_rule(goal, [], 3)
    assert rule == {"sign": 1, "need": tuner.goal_threshold(goal)}  # nothing else: no other trial matters
    assert scoring.can_stop(0.0, 0.8, rule) and not scoring.can_stop(0.0, 0.81, rule)
    assert not scoring.can_stop(0.0, 0.9, rule) and not scoring.can_stop(0.5, 0.5, None)  # no rule: in full
    # lower is better (perplexity): the best reachable is the interval's low end; signed space
    lower = Goal(baseline=10.0, tolerable_loss=0.01, higher_is_better=False)  # meets at <= 10.1
    rule = stop_rule(lower, [], 1)
    assert scoring.can_stop(10.2, math.inf, rule) and not scoring.can_stop(10.05, math.inf, rule)
    for metric in (10.1, 10.2, 9.0):  # the goal test is the same arithmetic as meets_goal
        assert (-metric >= tuner.goal_threshold(lower)) == tuner.meets_goal(metric, lower)


def test_intervals_always_hold_the_final_metric():
    rng = random.Random(7)
    for _ in range(200):
        counts = [rng.randint(1, 9) for _ in range(rng.randint(1, 8))]
        correct = [rng.randint(0, c) for c in counts]
        steps = list(steps_then_metric(scoring.accuracy_steps(zip(correct, counts), sum(counts))))
        metric = steps.pop()
        assert metric == sum(correct) / sum(counts)
        assert all(lo <= metric <= hi for lo, hi in steps)
        scores = [[rng.uniform(-2, 3) for _ in range(c)] for c in counts]
        for total in (sum(counts), None):
            steps = list(steps_then_metric(scoring.mean_steps(((sum(s), len(s)) for s in scores), -2, 3, total)))
            metric = steps.pop()
            assert metric == pytest.approx(sum(map(sum, scores)) / sum(counts))
            assert all(lo <= metric <= hi for lo, hi in steps) and len(steps) == (len(counts) if total else 0)


def test_run_steps_stops_at_the_first_batch_that_cannot_meet_the_goal():
    rule = {"sign": 1, "need": 0.6}
    metric, stopped, batches = scoring.run_steps(scoring.accuracy_steps([(1, 10), (1, 10), (1, 10), (9, 10)], 40),
                                                 rule)
    assert (metric, batches) == (None, 2) and stopped == (2 / 40, 22 / 40)  # (2 + 20) / 40 < 0.6 after two
    metric, stopped, batches = scoring.run_steps(scoring.accuracy_steps([(9, 10), (9, 10)], 20), rule)
    assert (metric, stopped, batches) == (18 / 20, None, 2)


# ------------------------------------------------------------------------------- end to end, on vs off

@pytest.mark.slow
async def test_python_recipe_stops_failing_trials_and_refines_only_what_the_answer_needs(client, start_workers):
    await start_workers(1)  # one trial at a time: INC's order, a deterministic history
    # A pass after failures: the two 2-bit trials stop once they cannot meet 0.5 %; trial 2 passes and wins,
    # so their full metrics are never needed (nothing is refined).
    on, off = await tune_on_and_off(client, digits_spec(strategy="list"))
    assert_same_answer_on_off(on, off)
    assert on["winner"]["index"] == 2 and on["met_goal"] is True
    assert [t["stopped_early"] for t in on["trials"][:2]] == [True, True]
    assert not any(t["refine"] for t in on["trials"])
    # Nothing passes (2-bit only): every trial stops; the best one (trial 0, 0.872) is refined, so the winner
    # and its metric are those of a full evaluation.
    spec = digits_spec(config_set=[{"rtn": {"bits": 2, "group_size": [32, -1, 16], "use_layer_wise": False}}],
                       strategy="list")
    on, off = await tune_on_and_off(client, spec)
    assert_same_answer_on_off(on, off)
    assert on["winner"]["index"] == 0 and on["met_goal"] is False
    assert all(t["stopped_early"] for t in on["trials"]) and on["trials"][0]["refine"] == "done"
    (log,) = await client.logs(on["task_id"], "refine/0")  # a job of its own kind, with its own log
    assert "refine job" in log["text"]


@pytest.mark.slow
async def test_a_trial_started_beside_the_baseline_learns_its_rule_and_stops(client, start_workers):
    """Two one-slot workers: the plan, then the baseline on one and trial 0 on the other at once. Trial 0's
    batches are slow, the baseline is not: the broker sends trial 0 its rule when the baseline lands (RULE),
    and it stops mid-evaluation (2-bit per channel cannot meet 0.5 %). The answer is the full evaluation's."""
    spec = digits_spec(config_set=[{"rtn": {"bits": [2, 8], "group_size": -1, "use_layer_wise": False}}],
                       strategy="list")
    spec["recipe"]["file"] = str(RECIPES / "slow_batches.py")
    spec["model"]["shared"] = True  # the recipe imports its neighbour: used where it is
    await start_workers(2)
    on, off = await tune_on_and_off(client, spec)
    assert_same_answer_on_off(on, off)
    assert on["winner"]["index"] == 1 and on["trials"][0]["stopped_early"]
    (log,) = await client.logs(on["task_id"], 0)
    assert "stopped early after" in log["text"]
