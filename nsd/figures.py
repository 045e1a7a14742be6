"""Deployment figures as plain data (pure; broker, clients, gateway and runners share it): what one trial's (or
the FP32 baseline's) figures say — latency, throughput, memory, size — its speed-up against the best FP32
form, and its cost under a task's `tuning.objective` (lower is better).

A trial's figures (a RESULT's `figures`, checked by `nsd.protocol.FIGURES`) hold one or more measured forms
(the baseline: FP32 eager and compiled; a trial: its deployed form) and the bytes on disk:

    {"size_bytes": int | null, "size_of": str, "input": {"names": [...], "shapes": [[...], ...]}, "notes": [...],
     "forms": [{"form", "runtime", "p50_ms", "p90_ms", "spread", "repeats", "throughput", "batch", "load_s",
                "compile_s", "peak_bytes", "run_bytes", "cores", "threads", "exclusive", "paused", "note"}]}

The figure a model is judged by is its fastest form (lowest p50): FP32 therefore counts compiled where that
is faster, and every speed-up is against the best FP32.
"""

from __future__ import annotations

import math
from typing import Any

FIGURES = ("latency", "throughput", "memory", "size")  # nsd.spec.FIGURE_OBJECTIVES


def best_form(figures: dict | None) -> dict | None:
    """The fastest measured form (lowest p50; the first on ties)."""
    forms = (figures or {}).get("forms") or []
    return min(forms, key=lambda f: f["p50_ms"]) if forms else None


def costs(figures: dict | None) -> dict[str, float | None]:
    """Each figure as a cost (lower is better): latency p50 ms, seconds per sample (1 / throughput), memory
    while serving (bytes; the running high-water mark, else the peak), size on disk (bytes)."""
    form = best_form(figures)
    if form is None:
        return {name: None for name in FIGURES}
    memory = form.get("run_bytes") if form.get("run_bytes") is not None else form.get("peak_bytes")
    return {"latency": form["p50_ms"], "throughput": 1.0 / form["throughput"] if form["throughput"] > 0 else None,
            "memory": None if memory is None else float(memory),
            "size": None if figures.get("size_bytes") is None else float(figures["size_bytes"])}


def weights(objective: Any) -> dict[str, float]:
    """A validated `tuning.objective` as weights over FIGURES ({} for "first")."""
    if isinstance(objective, dict):
        return {k: float(v) for k, v in objective.items()}
    return {} if objective in (None, "first") else {objective: 1.0}


def cost(figures: dict | None, objective: Any, baseline: dict | None = None) -> float | None:
    """A trial's cost under the objective, lower is better; None where a figure it needs is missing.

    One figure: that figure's cost. Weights (INC 2.x's weighted objective): the sum of weight x cost / the
    best FP32 form's cost, so that milliseconds and bytes add up (needs the baseline's figures)."""
    w = weights(objective)
    if not w:
        return None
    mine = costs(figures)
    if len(w) == 1:
        (name, _), = w.items()
        return mine[name]
    fp32 = costs(baseline)
    total = 0.0
    for name, weight in w.items():
        if mine[name] is None or not fp32[name]:
            return None
        total += weight * mine[name] / fp32[name]
    return total


def ties(a: float, best: float, margin: float) -> bool:
    """Whether cost `a` is within the noise margin of the best cost: such figures tie (earliest trial wins)."""
    return a <= best * (1 + margin) if best >= 0 else a <= best * (1 - margin)


def loses(figures: dict | None, prune: dict) -> bool:
    """Whether a trial's figures already lose to a passing trial's: its cost is beyond the margin of the best
    passing cost (`prune`: {objective, best, margin, baseline}, put in the trial job by the broker). Such a
    trial cannot win whatever its metric, so it need not be evaluated."""
    mine = cost(figures, prune["objective"], prune.get("baseline"))
    return mine is not None and not ties(mine, prune["best"], prune["margin"])


def summary(figures: dict | None, baseline: dict | None = None) -> dict[str, Any] | None:
    """What a person reads (nsd result, the web view): the fastest form's latency, throughput and memory,
    the size, and the speed-up and size ratio against the best FP32 form (None where not measured)."""
    form = best_form(figures)
    if form is None:
        return None
    fp32 = best_form(baseline)
    size, fp32_size = figures.get("size_bytes"), (baseline or {}).get("size_bytes")
    return {"latency_ms": form["p50_ms"], "p90_ms": form["p90_ms"], "spread": form["spread"],
            "throughput": form["throughput"], "peak_bytes": form.get("peak_bytes"), "size_bytes": size,
            "runtime": form["runtime"], "form": form["form"], "threads": form["threads"], "cores": form["cores"],
            "compile_s": form.get("compile_s"),
            "speedup": fp32["p50_ms"] / form["p50_ms"] if fp32 and form["p50_ms"] > 0 else None,
            "size_ratio": size / fp32_size if size is not None and fp32_size else None}


def pareto(points: list[tuple[int, float, float]]) -> list[int]:
    """Indexes not dominated in (metric, cost), both given as "larger is better" metric and "lower is better"
    cost: a point is dominated by one at least as good in both and better in one. Equal points all stay."""
    keep = []
    for i, m, c in points:
        if not any((m2 >= m and c2 <= c) and (m2 > m or c2 < c) for _, m2, c2 in points):
            keep.append(i)
    return keep


def pareto_of(trials: list[dict], objective: Any, baseline: dict | None, higher_is_better: bool) -> list[int]:
    """The result's `pareto`: scored trials (task-view dicts with index, metric, figures) that no other beats on
    both metric and cost — the objective's cost, or latency under "first"."""
    objective = "latency" if objective in (None, "first") else objective
    sign = 1 if higher_is_better else -1
    points = []
    for t in trials:
        c = cost(t.get("figures"), objective, baseline)
        if t.get("metric") is not None and math.isfinite(t["metric"]) and c is not None:
            points.append((t["index"], sign * t["metric"], c))
    return pareto(points)


def ms(value: float | None) -> str:
    """Milliseconds for people: 3 significant digits, never in exponent form."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f} ms" if value >= 100 else f"{value:.3g} ms"


def human_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"
