"""What early-stop intervals decide without full metrics, and which trials must be refined where they
cannot (pure).

A trial that stopped early holds an interval that surely contains its full metric (`low`, `high`; either
may be None: unbounded that way); a trial evaluated in full holds its metric (an interval of width 0); an
errored or cancelled trial holds nothing. Each decision that compares metrics — the best trial, the best
config the fallback search builds on, the op-wise impact order — is taken on the intervals where they
separate, and otherwise names the trials whose full metric would decide it: those are re-run in full
("refine" jobs) and the decision is asked again. Since an interval always holds the full metric, a
comparison the intervals decide is the one the full metrics give, so every answer is the full
evaluation's (`tests/test_lazy.py` checks it against the sequential reference on random tables).

Work in signed space (`sign * metric`: larger is better for both directions); a span is (lo, hi) there,
None for no metric. Orders are by value, best first, ties to the lower position (the earlier trial, or the
op listed first), positions with no metric last.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

Span = tuple[float, float] | None


def span(metric: float | None, low: float | None, high: float | None, sign: int) -> Span:
    """A trial's signed span: its metric, else its stop interval, else None."""
    if metric is not None:
        return sign * metric, sign * metric
    if low is None and high is None:
        return None
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    return (lo, hi) if sign > 0 else (-hi, -lo)


def before(spans: Sequence[Span], a: int, b: int) -> bool:
    """Whether position a surely comes before position b, whatever the full metrics inside their spans."""
    sa, sb = spans[a], spans[b]
    if sa is None or sb is None:
        return sb is None and (sa is not None or a < b)
    return sa[0] > sb[1] or (sa[0] == sb[1] and a < b)


def top(spans: Sequence[Span]) -> tuple[int | None, frozenset[int]]:
    """The first position of the order among those with a span (None: none has one), or None and the
    positions that could still be first (the interval ones to refine). O(n)."""
    scored = [i for i, s in enumerate(spans) if s is not None]
    if not scored:
        return None, frozenset()
    lead = max(scored, key=lambda i: (spans[i][0], -i))  # the largest sure value, earliest on ties
    could = [i for i in scored if not before(spans, lead, i)]
    if len(could) == 1:
        return lead, frozenset()
    return None, frozenset(i for i in could if spans[i][0] != spans[i][1])


def ranked(spans: Sequence[Span], r: int) -> tuple[list[int] | None, frozenset[int]]:
    """The first r positions of the order (positions with no metric included, last), or None and the
    interval positions whose full metric decides it: those in an undecided pair among the positions that
    could still be in the first r."""
    r = min(r, len(spans))
    could = [x for x in range(len(spans)) if sum(before(spans, y, x) for y in range(len(spans))) < r]
    undecided = {p for a in could for b in could if a < b and not before(spans, a, b) and not before(spans, b, a)
                 for p in (a, b)}
    if undecided:
        return None, frozenset(p for p in undecided if spans[p] is not None and spans[p][0] != spans[p][1])
    order = sorted(could, key=functools.cmp_to_key(lambda a, b: -1 if before(spans, a, b) else 1))
    return order[:r], frozenset()


def exact(spans: Sequence[Span], position: int) -> bool:
    s = spans[position]
    return s is not None and s[0] == s[1]


def stop_interval(body: dict, sign: int) -> tuple[float, float | None, float | None] | None:
    """(bound, low, high) of a stopped trial's result or cache entry, checked: the bound is the interval's best
    end (sign: 1 higher is better); a result from before intervals had only the bound (the other end is then
    unbounded). None when it does not hold together."""
    bound, low, high = finite(body.get("bound")), finite(body.get("low")), finite(body.get("high"))
    if bound is None:
        return None
    if low is None and high is None:
        low, high = (None, bound) if sign > 0 else (bound, None)
    if (bound != (high if sign > 0 else low)) or (low is not None and high is not None and low > high):
        return None
    return bound, low, high


def finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
