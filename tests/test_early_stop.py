"""Early stopping: a trial stops evaluating once it can neither meet the goal nor become the best trial,
and the answer (winner, its metric, best) is the one a full evaluation gives."""

from __future__ import annotations

import math
import os
import random

import pytest

from nsd.broker import tuner
from nsd.broker.objective import First
from nsd.broker.tuner import Goal, TrialView
from nsd.quant import scoring
from nsd.states import TrialState
from tests.conftest import digits_spec
from tests.peers import assert_same_answer_on_off, steps_then_metric, tune_on_and_off

os.environ.setdefault("LOGLEVEL", "WARNING")

F, P, R = TrialState.FAILED_GOAL, TrialState.PASSED, TrialState.RUNNING


def stop_rule(goal: Goal, trials, index: int) -> dict:
    return First(goal.higher_is_better).stop_rule(goal, trials, index)


# ------------------------------------------------------------------------------------------------ pure

def test_stop_rule_needs_a_finished_metric_and_keeps_ties_for_the_earlier_trial():
    goal = Goal(baseline=0.9, tolerable_loss=0.1)  # meets at >= 0.81
    assert stop_rule(goal, [TrialView(0, R)], 1)["best"] is None  # nothing to beat: runs in full
    rule = stop_rule(goal, [TrialView(0, F, 0.5), TrialView(1, F, 0.7), TrialView(2, R)], 3)
    assert rule == {"sign": 1, "need": tuner.goal_threshold(goal), "best": 0.7, "tie_stops": True}
    assert scoring.can_stop(0.0, 0.69, rule) and scoring.can_stop(0.0, 0.7, rule)  # a tie loses to trial 1
    assert not scoring.can_stop(0.0, 0.71, rule)  # might become the best
    early = stop_rule(goal, [TrialView(1, F, 0.7)], 0)  # trial 0 would win a tie (earliest index)
    assert not scoring.can_stop(0.0, 0.7, early) and scoring.can_stop(0.0, 0.6999, early)
    high = stop_rule(goal, [TrialView(0, F, 0.95)], 1)  # a better finished metric, but not a pass
    assert not scoring.can_stop(0.0, 0.9, high)  # 0.9 >= 0.81 might meet the goal: it may win
    # lower is better (perplexity): the best reachable is the interval's low end; signed space
    lower = Goal(baseline=10.0, tolerable_loss=0.01, higher_is_better=False)  # meets at <= 10.1
    rule = stop_rule(lower, [TrialView(0, F, 12.0)], 1)
    assert scoring.can_stop(12.5, math.inf, rule) and not scoring.can_stop(11.0, math.inf, rule)
    assert not scoring.can_stop(10.05, math.inf, stop_rule(lower, [TrialView(0, F, 9.0)], 1))
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


def test_run_steps_stops_at_the_first_batch_that_cannot_matter():
    rule = {"sign": 1, "need": 0.8, "best": 0.6, "tie_stops": False}
    metric, bound, batches = scoring.run_steps(scoring.accuracy_steps([(1, 10), (1, 10), (1, 10), (9, 10)], 40),
                                               rule)
    assert (metric, batches) == (None, 2) and bound == 22 / 40  # (2 + 20) / 40 < 0.6 after two batches
    metric, bound, batches = scoring.run_steps(scoring.accuracy_steps([(9, 10), (9, 10)], 20), rule)
    assert (metric, bound, batches) == (18 / 20, None, 2)


# ------------------------------------------------------------------------------- end to end, on vs off

@pytest.mark.slow
async def test_python_recipe_with_score_batches_stops_early_with_the_same_answer(client, start_workers):
    # 2-bit only: nothing passes 0.5 %, so the best metric wins (trial 0, 0.872). Trial 1 (0.592) and
    # trial 2 (0.831) cannot beat it: they stop once 47 of the 360 test digits are missed.
    spec = digits_spec(config_set=[{"rtn": {"bits": 2, "group_size": [32, -1, 16], "use_layer_wise": False}}],
                       strategy="list")  # the config set only (no fallback search after it)
    await start_workers(1)  # one at a time: trial 0 has finished when the others start
    on, off = await tune_on_and_off(client, spec)
    assert_same_answer_on_off(on, off)
    assert on["winner"]["index"] == 0 and on["met_goal"] is False
    assert [t["stopped_early"] for t in on["trials"]] == [False, True, True]
    assert all(t["bound"] < on["winner"]["metric"] for t in on["trials"][1:])
