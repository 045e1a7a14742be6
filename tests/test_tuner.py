"""The decision logic, pure: no sockets, no INC."""

from nsd.broker.objective import First
from nsd.broker.tuner import Decision, Goal, TrialView, after_lost_lease, meets_goal
from nsd.states import TrialState as S

FIRST, LOWER = First(True), First(False)


def decide(trials, higher_is_better, exhausted=False):
    return (FIRST if higher_is_better else LOWER).decide(trials, exhausted)


def best(trials, higher_is_better):
    return (FIRST if higher_is_better else LOWER).best(trials)


to_cancel, to_dispatch = FIRST.to_cancel, FIRST.to_dispatch


def trials(*states, metrics=None):
    metrics = metrics or [None] * len(states)
    return [TrialView(i, s, m) for i, (s, m) in enumerate(zip(states, metrics))]


def test_meets_goal_relative_is_incs_formula():
    goal = Goal(baseline=0.8, tolerable_loss=0.01)
    assert meets_goal(0.8 * (1 - 0.01), goal)  # INC: result >= baseline * (1 - tolerable_loss)
    assert not meets_goal(0.79, goal)
    assert meets_goal(0.9, goal)


def test_meets_goal_absolute_and_lower_is_better():
    assert meets_goal(0.75, Goal(0.8, 0.05, "absolute"))
    assert not meets_goal(0.74, Goal(0.8, 0.05, "absolute"))
    ppl = Goal(baseline=10.0, tolerable_loss=0.1, higher_is_better=False)
    assert meets_goal(11.0, ppl) and meets_goal(9.0, ppl) and not meets_goal(11.01, ppl)
    assert meets_goal(10.5, Goal(10.0, 0.5, "absolute", False))
    assert not meets_goal(10.6, Goal(10.0, 0.5, "absolute", False))
    assert not meets_goal(float("nan"), Goal(10.0, 0.5))


def test_winner_is_lowest_passing_once_everything_below_finished():
    ts = trials(S.RUNNING, S.PASSED, S.PASSED, S.RUNNING)
    assert decide(ts, True) is None  # trial 0 could still pass
    ts = trials(S.FAILED_GOAL, S.PASSED, S.PASSED, S.RUNNING)
    assert decide(ts, True) == Decision(1, True)
    ts = trials(S.PASSED, S.ERROR, S.PASSED)
    assert decide(ts, True) == Decision(0, True)


def test_cancellation_set_is_unfinished_trials_above_lowest_pass():
    ts = trials(S.RUNNING, S.PASSED, S.RUNNING, S.PENDING, S.FAILED_GOAL)
    assert to_cancel(ts) == [2, 3]
    assert to_cancel(trials(S.RUNNING, S.PENDING)) == []


def test_best_if_none_passes_earliest_on_ties():
    ts = trials(S.FAILED_GOAL, S.FAILED_GOAL, S.ERROR, S.FAILED_GOAL, metrics=[0.5, 0.7, None, 0.7])
    assert decide(ts, True) == Decision(1, False)
    assert decide(ts, False) == Decision(0, False)
    assert best(trials(S.ERROR, S.ERROR), True) is None
    assert decide(trials(S.ERROR, S.CANCELLED), True) == Decision(None, False)


def test_undecided_while_anything_runs_unless_exhausted():
    ts = trials(S.FAILED_GOAL, S.RUNNING, S.PASSED, metrics=[0.1, None, 0.9])
    assert decide(ts, True) is None
    assert decide(ts, True, exhausted=True) == Decision(2, True)
    ts = trials(S.FAILED_GOAL, S.RUNNING, metrics=[0.1, None])
    assert decide(ts, True, exhausted=True) == Decision(0, False)


def test_dispatch_in_index_order_within_limit_and_below_a_pass():
    ts = trials(S.RUNNING, S.PENDING, S.PENDING, S.PENDING)
    assert to_dispatch(ts, 2) == [1]
    assert to_dispatch(ts, 0) == [1, 2, 3]
    ts = trials(S.PENDING, S.PASSED, S.PENDING)
    assert to_dispatch(ts, 0) == [0]


def test_lost_lease_retries_then_gives_up():
    assert after_lost_lease(1, 3) == (S.PENDING, 2)
    assert after_lost_lease(3, 3) == (S.ERROR, 3)
