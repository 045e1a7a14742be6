"""The fallback search, pure: the broker's distributed decisions equal the sequential procedure."""

import hashlib
import random

import pytest

from nsd.broker import search, tuner
from nsd.broker.search import (ACCUMULATED, BLOCK_WISE, CONFIG, OP_WISE, Layout, OpList, Step, accumulated_stage,
                               block_stage, decide, impact_order, next_stage, op_stage, sequential)
from nsd.states import TrialState as S


def test_stage_contents_follow_inc_2x_basic():
    ops = OpList(("l0.a", "l0.b", "l1.a", "l1.b", "head"), (("l0.a", "l0.b"), ("l1.a", "l1.b")))
    assert block_stage(ops) == [("l1.a", "l1.b"), ("l0.a", "l0.b", "l1.a", "l1.b")]
    assert op_stage(ops) == [("head",), ("l1.b",), ("l1.a",), ("l0.b",), ("l0.a",)]
    # best first, ties keep bottom-up order, no metric last; lower-is-better mirrored
    order = impact_order([("head", 0.5), ("l1.b", 0.7), ("l1.a", None), ("l0.b", 0.7), ("l0.a", 0.6)], True)
    assert order == ["l1.b", "l0.b", "l0.a", "head", "l1.a"]
    assert impact_order([("x", 3.0), ("y", 1.0), ("z", 1.0)], False) == ["y", "z", "x"]
    assert accumulated_stage(["a", "b", "c"]) == [("a", "b"), ("a", "b", "c")]
    assert search.fallback_label("rtn(bits=3)", ["a", "b", "c"]) == "rtn(bits=3) + 3 ops in FP32"
    assert search.fallback_label("rtn(bits=3)", ["fc2"]) == "rtn(bits=3) + fc2 in FP32"


def _table(seed: int, values: list[float], p_error: float):
    """A deterministic metric for every possible trial: a trial is (base config, set of FP32 ops); the same
    set on the same base measures the same (INC is deterministic), whichever stage runs it."""

    def metric_of(stage: str, base: int, fallback: tuple[str, ...]):
        key = f"{seed}|{base}|{sorted(fallback)}".encode()
        h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
        if (h % 1000) / 1000 < p_error:
            return None
        return values[(h // 1000) % len(values)]

    return metric_of


def _random_case(rng: random.Random):
    n_ops = rng.choice([0, 1, 2, 3, 5, 8])
    ops = tuple(f"layer.{i // 2}.op{i % 2}" if i < n_ops - 1 else "head" for i in range(n_ops))
    blocks = ()
    if rng.random() < 0.5 and n_ops >= 3:
        blocks = tuple(tuple(o for o in ops if o.startswith(f"layer.{b}.")) for b in range((n_ops - 1) // 2))
        blocks = tuple(b for b in blocks if len(b) >= 2)
    families = tuple(rng.choice(["rtn", "static_quant"]) for _ in range(rng.randint(1, 4)))
    oplists = {"rtn": OpList(ops, blocks), "static_quant": OpList(ops[: max(0, n_ops - 1)])}
    total = len(families) + len(blocks) + n_ops + max(0, n_ops - 1)
    layout = Layout(families, oplists, max_trials=rng.randint(1, total + 2), higher_is_better=rng.random() < 0.6)
    values = sorted(rng.sample([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], rng.randint(1, 4)))
    goal = tuner.Goal(baseline=rng.choice([0.7, 0.8, 0.9, 1.1]), tolerable_loss=rng.choice([0.0, 0.05]),
                      criterion=rng.choice(["relative", "absolute"]), higher_is_better=layout.higher_is_better)
    if not layout.higher_is_better:
        goal = tuner.Goal(rng.choice([0.5, 0.6, 0.7]), goal.tolerable_loss, goal.criterion, False)
    return layout, _table(rng.randrange(1 << 30), values, rng.choice([0.0, 0.0, 0.1])), \
        (lambda m: tuner.meets_goal(m, goal))


def distributed(layout: Layout, metric_of, passes, slots: int, rng: random.Random):
    """The broker's loop over search.next_stage/decide and tuner's rules, with `slots` trials at once that
    finish in a random order."""
    steps = [Step(i, CONFIG, (), i) for i in range(min(len(layout.families), layout.max_trials))]
    while True:
        lowest = layout.rules.passed(s.view() for s in steps)
        if lowest is not None:
            steps = [s if s.index <= lowest or s.state.finished else Step(s.index, s.stage, s.fallback, s.base,
                                                                          S.CANCELLED) for s in steps]
        steps += [Step(len(steps) + k, n.stage, n.fallback, n.base) for k, n in
                  enumerate(next_stage(layout, steps))]
        if all(s.state.finished for s in steps):
            return steps, decide(layout, steps)
        assert decide(layout, steps) is None or lowest is not None
        running = [s for s in steps if s.state is S.RUNNING]
        for s in [s for s in steps if s.state is S.PENDING][: max(0, slots - len(running))]:
            steps[s.index] = Step(s.index, s.stage, s.fallback, s.base, S.RUNNING)
        done = rng.choice([s for s in steps if s.state is S.RUNNING])
        m = metric_of(done.stage, done.base, done.fallback)
        state = S.ERROR if m is None else S.PASSED if passes(m) else S.FAILED_GOAL
        steps[done.index] = Step(done.index, done.stage, done.fallback, done.base, state, m)


@pytest.mark.parametrize("slots", [1, 3, 20])
def test_distributed_equals_sequential_on_random_tables(slots):
    rng = random.Random(1000 + slots)
    seen = {"stages": set(), "nothing": 0, "cut": set()}
    for case in range(400):
        layout, metric_of, passes = _random_case(rng)
        ref_run, ref_winner, ref_met = sequential(layout, metric_of, passes)
        steps, decision = distributed(layout, metric_of, passes, slots, random.Random(case))
        assert len(steps) <= layout.max_trials  # speculation never adds to max_trials
        if ref_winner is None:
            assert decision.winner is None
            continue
        w, r = steps[decision.winner], ref_run[ref_winner]
        assert (decision.met_goal, w.index, w.stage, w.base, w.fallback, w.metric) == \
            (ref_met, r.index, r.stage, r.base, r.fallback, r.metric), case
        for s, t in zip(steps, ref_run):  # the same global order, trial by trial
            assert (s.stage, s.base, s.fallback) == (t.stage, t.base, t.fallback)
            if s.state in (S.PASSED, S.FAILED_GOAL, S.ERROR):
                assert s.metric == t.metric
        seen["stages"].add((r.stage, ref_met))
        seen["nothing"] += not ref_met
        if len(ref_run) == layout.max_trials and not ref_met:
            seen["cut"].add(ref_run[-1].stage)
    # the random tables covered every way the search can end
    assert {(CONFIG, True), (BLOCK_WISE, True), (OP_WISE, True), (ACCUMULATED, True)} <= seen["stages"]
    assert seen["nothing"] > 0
    assert seen["cut"] == {CONFIG, BLOCK_WISE, OP_WISE, ACCUMULATED}


def test_list_strategy_never_adds_stages():
    layout = Layout(("rtn", "rtn"), {"rtn": OpList(("a", "b"))}, strategy="list")
    steps = [Step(0, CONFIG, (), 0, S.FAILED_GOAL, 0.5), Step(1, CONFIG, (), 1, S.FAILED_GOAL, 0.6)]
    assert next_stage(layout, steps) == []
    assert decide(layout, steps) == tuner.Decision(1, False)


def test_stages_appear_when_known_and_accumulated_is_speculative():
    layout = Layout(("rtn",), {"rtn": OpList(("l.0.a", "l.0.b", "head"), (("l.0.a", "l.0.b"),))})
    steps = [Step(0, CONFIG, (), 0, S.RUNNING)]
    assert next_stage(layout, steps) == [] and decide(layout, steps) is None
    steps = [Step(0, CONFIG, (), 0, S.FAILED_GOAL, 0.5)]
    new = next_stage(layout, steps)
    assert [(n.stage, n.fallback) for n in new] == [(BLOCK_WISE, ("l.0.a", "l.0.b")), (OP_WISE, ("head",)),
                                                    (OP_WISE, ("l.0.b",)), (OP_WISE, ("l.0.a",))]
    assert decide(layout, steps) is None  # nothing unfinished, but a stage is still to come
    # op-wise all finished while the block-wise trial still runs: accumulated starts anyway
    steps += [Step(1, BLOCK_WISE, ("l.0.a", "l.0.b"), 0, S.RUNNING), Step(2, OP_WISE, ("head",), 0, S.FAILED_GOAL, 0.6),
              Step(3, OP_WISE, ("l.0.b",), 0, S.FAILED_GOAL, 0.7), Step(4, OP_WISE, ("l.0.a",), 0, S.FAILED_GOAL, 0.6)]
    assert [n.fallback for n in next_stage(layout, steps)] == [("l.0.b", "head"), ("l.0.b", "head", "l.0.a")]
    # ... but not once something passed: the winner is at or below it
    steps[1] = Step(1, BLOCK_WISE, ("l.0.a", "l.0.b"), 0, S.PASSED, 0.9)
    assert next_stage(layout, steps) == [] and decide(layout, steps) == tuner.Decision(1, True)


def test_spec_strategy_defaults_to_basic_and_is_checked():
    from nsd.spec import SpecError, validate

    raw = {"name": "x", "model": {"path": "/m", "shared": True}, "recipe": {"kind": "python", "file": "/r.py"},
           "tuning": {"config_set": [{"rtn": {}}]}}
    assert validate(raw).tuning.strategy == "basic"
    assert validate({**raw, "tuning": {**raw["tuning"], "strategy": "list"}}).tuning.strategy == "list"
    with pytest.raises(SpecError, match="tuning.strategy: must be one of basic, list"):
        validate({**raw, "tuning": {**raw["tuning"], "strategy": "auto"}})


def test_plan_op_lists_are_checked():
    assert search.parse_oplists(None) == {}
    assert search.parse_oplists({"rtn": {"ops": ["a", "b"], "blocks": [["a", "b"]]}}) == \
        {"rtn": OpList(("a", "b"), (("a", "b"),))}
    for bad in ([], {"rtn": {"ops": "a"}}, {"rtn": {"ops": ["a", "a"]}}, {"rtn": {"ops": ["a"], "blocks": [["b"]]}},
                {"rtn": {"ops": [1]}}, {"rtn": {"ops": ["a"], "blocks": [[]]}}, {"rtn": {"ops": ["a"], "blocks": [[{}]]}},
                {"rtn": {"ops": [["a"]]}}, {"rtn": None}):
        assert search.parse_oplists(bad) is None, bad
