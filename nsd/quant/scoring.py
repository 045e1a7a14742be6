"""Evaluation in batches, with the interval the final metric can still reach: what early stopping needs.

A recipe that can bound its metric evaluates through an *evaluate_steps* generator: after each batch it
yields `(low, high)`, an interval that surely holds the final metric, and it returns the metric itself
(`return` in a generator: StopIteration.value). Draining it is a full evaluation, and gives the same float
whether or not anything was checked on the way — so early stopping on or off cannot change a metric.

- built-in recipes (`nsd.quant.builtin`): accuracy (the rest all correct / all wrong), mean cosine (the
  rest all 1 / all -1), perplexity (the rest NLL 0: exp of the NLL so far over every token; no upper bound);
  f1 and spearman have no exact bound and yield nothing.
- python recipes opt in with `score_batches(model)` yielding `(sum_of_scores, count)` per batch and a
  module-level `SCORE_RANGE = (lo, hi)` per sample: the metric is the total sum / the total count
  (`mean_steps`). The bound needs the total count up front: the recipe's `SCORE_COUNT` if it has one, else
  the runner learns it from its first full pass of the task (that trial runs in full).

Sums of floats may round differently than the bound's arithmetic, so bounds of float sums are widened by
`slack` (1e-9, relative to the score range): a bound is always a true bound, the answer never changes; a
trial only stops a hair later than it could. Integer counts (accuracy) and perplexity (a running sum of
non-negative terms, rounding is monotone) are exact without it.

`can_stop` decides with the rule the broker puts in each trial job (`nsd.broker.objective.First.stop_rule`).
Pure python: no torch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Generator, Iterable

Steps = Generator[tuple[float, float], None, float]
SLACK = 1e-9


def can_stop(low: float, high: float, rule: dict | None) -> bool:
    """Whether a trial whose final metric lies in [low, high] can neither meet the goal nor become the best
    trial, under `rule` (signed space: sign * metric, larger is better)."""
    if not rule or rule.get("best") is None:
        return False
    reach = high if rule["sign"] > 0 else -low  # the best the trial can still reach, signed
    if not reach < rule["need"]:  # could still meet the goal (NaN: never stop)
        return False
    return reach < rule["best"] or (reach == rule["best"] and bool(rule["tie_stops"]))


def reachable(low: float, high: float, sign: int) -> float:
    """The best metric the trial can still reach (what a stopped trial reports as its `bound`)."""
    return high if sign > 0 else low


def run_steps(steps: Steps, rule: dict | None) -> tuple[float | None, float | None, int]:
    """Evaluate until done or until `rule` says the trial cannot matter: (metric or None, bound or None,
    batches evaluated)."""
    batches = 0
    try:
        while True:
            low, high = next(steps)
            batches += 1
            if can_stop(low, high, rule):
                steps.close()
                return None, reachable(low, high, rule["sign"]), batches
    except StopIteration as done:
        return done.value, None, batches


def drain(steps: Steps) -> float:
    """The full evaluation: every batch, the final metric."""
    return run_steps(steps, None)[0]


def accuracy_steps(batches: Iterable[tuple[int, int]], total: int) -> Steps:
    """batches of (correct, count); metric correct / total, exactly as `metrics.accuracy` computes it."""
    correct = seen = 0
    for right, count in batches:
        correct, seen = correct + int(right), seen + int(count)
        yield correct / total, (correct + total - seen) / total
    return correct / total


def mean_steps(batches: Iterable[tuple[float, int]], lo: float, hi: float, total: int | None,
               on_count: Callable[[int], None] | None = None) -> Steps:
    """batches of (sum of per-sample scores in [lo, hi], count); metric = total sum / total count.
    Without `total` nothing is bounded (the pass runs in full) and `on_count` learns it."""
    s, n = 0.0, 0
    slack = SLACK * max(1.0, abs(lo), abs(hi))
    for part, count in batches:
        s, n = s + float(part), n + int(count)
        if total is not None:
            rest = total - n
            if rest < 0:
                raise ValueError(f"score_batches() gave more than SCORE_COUNT = {total} samples")
            yield (s + rest * lo) / total - slack, (s + rest * hi) / total + slack
    if n <= 0:
        raise ValueError("score_batches() gave no samples")
    if total is not None and n != total:
        raise ValueError(f"score_batches() gave {n} samples, SCORE_COUNT says {total}")
    if on_count is not None:
        on_count(n)
    return s / n


class PythonScorer:
    """A python recipe's `score_batches` + `SCORE_RANGE` (+ optional `SCORE_COUNT`) as evaluate_steps."""

    def __init__(self, module: Any):
        self.score_batches = module.score_batches
        lo, hi = self.range = check_range(getattr(module, "SCORE_RANGE", None))
        count = getattr(module, "SCORE_COUNT", None)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
            raise ValueError(f"SCORE_COUNT must be a positive int, got {count!r}")
        self.count: int | None = count

    def _learn(self, n: int) -> None:
        self.count = n

    def steps(self, model) -> Steps:
        lo, hi = self.range
        return mean_steps(self.score_batches(model), lo, hi, self.count, self._learn)


def check_range(value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"a recipe with score_batches() needs SCORE_RANGE = (lo, hi), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"SCORE_RANGE must be finite with lo <= hi, got {value!r}")
    return lo, hi
