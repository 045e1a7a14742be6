"""INC 2.x's `basic` fallback search, pure: a sequential reference and the distributed form the broker runs.

The procedure (`tuning.strategy = "basic"`), in one global trial order:
  1. config       the config set in INC's order (what `"list"` runs);
  2. best         the best config-set trial (earliest on ties); every later trial builds on its config;
  3. block-wise   last block in FP32, last two blocks, ... (only where the model has blocks);
  4. op-wise      one trial per op, bottom-up, only that op in FP32;
  5. accumulated  ops sorted by their op-wise metric, best first (stable), prefixes of size 2..N.
The winner is the first passing trial in that order; `max_trials` counts positions in it over all stages;
if nothing passes, the best metric over every trial wins (earliest on ties).

The distributed form keeps one invariant that makes the answer identical to the sequential one: a trial's
broker index IS its position in the global order. Stages are appended whole (cut at `max_trials`) as soon
as their content is known, so the objective's rules (`nsd.broker.objective.First`: lowest passing index wins
once everything below it has finished, cancel above it, best metric earliest index otherwise) decide over
all stages unchanged:
  - block-wise and op-wise are known once every config trial has finished and none passed (`best` known);
  - accumulated is known once every op-wise trial has finished, if nothing has passed yet (block-wise trials
    may still run: the accumulated prefixes are dispatched speculatively, lowest first).
Speculation only ever runs trials at positions < max_trials, so it never adds to `max_trials`; a trial
that ran after the winner's position is reported (cancelled, or with its metric) but cannot win.
An objective that ranks every passing trial (`ByFigures`, `speculates = False`) could be won by such a trial,
so under it the accumulated stage waits until the block-wise and op-wise trials have all finished with none
passing: the candidates are then the passing trials of the first stage group that has any, whatever the
finishing order (`tests/test_objective_figures.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from nsd.broker import tuner
from nsd.broker.objective import First, Objective
from nsd.states import TrialState

CONFIG, BLOCK_WISE, OP_WISE, ACCUMULATED = "config", "block-wise", "op-wise", "accumulated"
STAGES = (CONFIG, BLOCK_WISE, OP_WISE, ACCUMULATED)
STRATEGIES = ("basic", "list")


@dataclass(frozen=True)
class OpList:
    """A config family's quantizable ops (module order) and blocks (module order, each a list of op names)."""
    ops: tuple[str, ...] = ()
    blocks: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Layout:
    """What the plan fixed: the config trials' families, each family's ops, and the search's bounds."""
    families: tuple[str, ...]  # per config trial, its INC config name ("rtn", "static_quant", ...)
    oplists: Mapping[str, OpList] = field(default_factory=dict)
    max_trials: int = 100
    higher_is_better: bool = True
    strategy: str = "basic"
    objective: Objective | None = None  # who wins over all stages; None: INC's (First)

    @property
    def rules(self) -> Objective:
        return self.objective or First(self.higher_is_better)


@dataclass(frozen=True)
class Step:
    """A trial as the search sees it. `base` is the config trial it builds on (itself for a config trial)."""
    index: int
    stage: str
    fallback: tuple[str, ...]
    base: int
    state: TrialState = TrialState.PENDING
    metric: float | None = None
    cost: float | None = None  # under a figures objective (nsd.broker.objective.ByFigures)

    def view(self) -> tuner.TrialView:
        return tuner.TrialView(self.index, self.state, self.metric, self.cost)


@dataclass(frozen=True)
class NewTrial:
    stage: str
    fallback: tuple[str, ...]
    base: int


def _scored(metric: float | None) -> bool:
    return metric is not None and math.isfinite(metric)


def best_config(metrics: Sequence[float | None], higher_is_better: bool) -> int | None:
    """The best config-set metric, earliest on ties (None: no config trial produced one)."""
    sign = 1 if higher_is_better else -1
    scored = [(i, m) for i, m in enumerate(metrics) if _scored(m)]
    return max(scored, key=lambda im: sign * im[1])[0] if scored else None  # max keeps the first


def block_stage(oplist: OpList) -> list[tuple[str, ...]]:
    """best + last block, best + last two blocks, ...: op names in module order."""
    blocks = oplist.blocks
    return [tuple(n for b in blocks[len(blocks) - k:] for n in b) for k in range(1, len(blocks) + 1)]


def op_stage(oplist: OpList) -> list[tuple[str, ...]]:
    """One op in FP32 per trial, bottom-up (INC 2.x: `quant_ops[::-1]`)."""
    return [(name,) for name in reversed(oplist.ops)]


def impact_order(op_metrics: Sequence[tuple[str, float | None]], higher_is_better: bool) -> list[str]:
    """Ops by their op-wise metric, best first; stable (ties keep bottom-up order); no metric sorts last."""
    sign = -1 if higher_is_better else 1
    return [name for name, m in sorted(op_metrics, key=lambda nm: (0, sign * nm[1]) if _scored(nm[1]) else (1, 0))]


def accumulated_stage(order: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(order[:k]) for k in range(2, len(order) + 1)]


# ---- the sequential reference ---------------------------------------------------------------------


def sequential(layout: Layout, metric_of: Callable[[str, int, tuple[str, ...]], float | None],
               passes: Callable[[float], bool]) -> tuple[list[Step], int | None, bool]:
    """Run the procedure one trial at a time. `metric_of(stage, base, fallback)` is a trial's metric (None:
    it errored). Returns (trials run, winner index or None, met_goal)."""
    run: list[Step] = []

    def trial(stage: str, base: int, fallback: tuple[str, ...]) -> bool:
        """Run one trial; True when the search must stop (it passed, or max_trials is reached)."""
        m = metric_of(stage, base, fallback)
        state = TrialState.ERROR if not _scored(m) else TrialState.PASSED if passes(m) else TrialState.FAILED_GOAL
        run.append(Step(len(run), stage, fallback, base if stage != CONFIG else len(run), state,
                        m if _scored(m) else None))
        return state is TrialState.PASSED or len(run) >= layout.max_trials

    def answer() -> tuple[list[Step], int | None, bool]:
        if run and run[-1].state is TrialState.PASSED:
            return run, run[-1].index, True
        return run, layout.rules.best([s.view() for s in run]), False

    for i in range(len(layout.families)):
        if trial(CONFIG, i, ()):
            return answer()
    base = best_config([s.metric for s in run], layout.higher_is_better)
    if layout.strategy != "basic" or base is None:
        return answer()
    oplist = layout.oplists.get(layout.families[base], OpList())
    for fb in block_stage(oplist):
        if trial(BLOCK_WISE, base, fb):
            return answer()
    for fb in op_stage(oplist):
        if trial(OP_WISE, base, fb):
            return answer()
    order = impact_order([(s.fallback[0], s.metric) for s in run if s.stage == OP_WISE], layout.higher_is_better)
    for fb in accumulated_stage(order):
        if trial(ACCUMULATED, base, fb):
            return answer()
    return answer()


# ---- the distributed form: what the broker asks after every trial change -----------------------------


def next_stage(layout: Layout, steps: Sequence[Step]) -> list[NewTrial]:
    """Trials to append now (indexes continue the global order; cut at max_trials), or [] if none yet.

    Nothing is added once any trial has passed: the winner lies at or below it, among trials that exist.
    """
    room = layout.max_trials - len(steps)
    if layout.strategy != "basic" or room <= 0 or any(s.state is TrialState.PASSED for s in steps):
        return []
    n_configs = len(layout.families)
    configs = steps[:n_configs]
    if len(steps) == n_configs:  # only the config stage exists: the fallback stages wait for `best`
        if not all(s.state.finished for s in configs):
            return []
        base = best_config([s.metric for s in configs], layout.higher_is_better)
        if base is None:
            return []
        oplist = layout.oplists.get(layout.families[base], OpList())
        new = [NewTrial(BLOCK_WISE, fb, base) for fb in block_stage(oplist)]
        new += [NewTrial(OP_WISE, fb, base) for fb in op_stage(oplist)]
        return new[:room]
    op_wise = [s for s in steps if s.stage == OP_WISE]
    if any(s.stage == ACCUMULATED for s in steps) or not op_wise:
        return []
    if not layout.rules.speculates and not all(s.state.finished for s in steps):
        return []  # an objective that ranks every passing trial: a stage is added only after the last one
    base = op_wise[0].base
    oplist = layout.oplists.get(layout.families[base], OpList())
    if len(op_wise) < len(oplist.ops) or not all(s.state.finished for s in op_wise):
        return []  # the op-wise stage was cut by max_trials, or its impact order is not known yet
    order = impact_order([(s.fallback[0], s.metric) for s in op_wise], layout.higher_is_better)
    return [NewTrial(ACCUMULATED, fb, base) for fb in accumulated_stage(order)][:room]


def decide(layout: Layout, steps: Sequence[Step], exhausted: bool = False) -> tuner.Decision | None:
    """The outcome, or None while unknown: the objective's, once no stage is left to add."""
    views = [s.view() for s in steps]
    if not exhausted and next_stage(layout, steps):
        return None
    return layout.rules.decide(views, exhausted)


def fallback_label(base_label: str, fallback: Sequence[str]) -> str:
    """`rtn(bits=3) + fc2 in FP32`, `rtn(bits=3) + 3 ops in FP32`."""
    if not fallback:
        return base_label
    what = fallback[0] if len(fallback) == 1 else f"{len(fallback)} ops"
    return f"{base_label} + {what} in FP32"


def parse_oplists(raw: object) -> dict[str, OpList] | None:
    """A plan's `ops` ({family: {"ops": [...], "blocks": [[...]]}}) checked, or None if malformed."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        return None
    out = {}
    for family, entry in raw.items():
        ops = entry.get("ops") if isinstance(entry, dict) else None
        blocks = entry.get("blocks", []) if isinstance(entry, dict) else None
        if not isinstance(family, str) or not _names(ops) or len(set(ops)) != len(ops) \
                or not isinstance(blocks, list) or not all(_names(b) and b and set(b) <= set(ops) for b in blocks):
            return None
        out[family] = OpList(tuple(ops), tuple(tuple(b) for b in blocks))
    return out


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def oplists_to_plain(oplists: Mapping[str, OpList]) -> dict:
    return {f: {"ops": list(o.ops), "blocks": [list(b) for b in o.blocks]} for f, o in oplists.items()}
