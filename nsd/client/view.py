"""Pure helpers over task views: fold events into a snapshot, and render views for people."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from nsd.figures import human_bytes, ms, pareto_of, summary
from nsd.states import TaskState, TrialState


def apply_event(task: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """The task view after one event (a new dict; a snapshot event replaces the view)."""
    if event["kind"] == "snapshot":
        return copy.deepcopy(event["task"])
    task = copy.deepcopy(task)
    fold_event(task, event)
    return task


def fold_event(task: dict[str, Any], event: dict[str, Any]) -> None:
    """Apply one event (not a snapshot) to the view in place: what the gateway does to the one view it
    keeps per followed task, where copying 20,000 trials per event would cost more than the event."""
    task["seq"] = event["seq"]
    if event["kind"] == "state":
        task["state"] = event["state"]
        for key in ("met_goal", "error"):
            if key in event:
                task[key] = event[key]
        if event.get("winner") is not None:
            w = task["trials"][event["winner"]]
            task["winner"] = {k: w.get(k) for k in ("index", "config", "label", "stage", "fallback", "metric",
                                                    *DEPLOYED)}
    elif event["kind"] == "plan":
        task["baseline"] = event["baseline"]
        task["trials"] = [_new_trial(t) for t in event["trials"]]
        task["baseline_figures"], task["baseline_on"] = event.get("baseline_figures"), event.get("baseline_on")
        task["baseline_deploy"] = summary(task["baseline_figures"], task["baseline_figures"])
    elif event["kind"] == "baseline":  # the FP32 metric (and figures), evaluated beside the first trials
        task["baseline"] = event["baseline"]
        task["baseline_figures"], task["baseline_on"] = event.get("baseline_figures"), event.get("baseline_on")
        task["baseline_deploy"] = summary(task["baseline_figures"], task["baseline_figures"])
    elif event["kind"] == "stage":  # the fallback search added a stage's trials
        task["trials"] = task["trials"] + [_new_trial(t) for t in event["trials"]]
    elif event["kind"] == "trial":
        trial = task["trials"][event["index"]]
        trial.update({k: event[k] for k in ("state", "metric", "attempt", "worker", "seconds", "error")})
        trial.update({k: event.get(k) for k in LAZY + DEPLOYED if k in event})
        if trial.get("figures"):
            task["pareto"] = pareto_of(task["trials"], task.get("objective"), task.get("baseline_figures"),
                                       task["goal"]["higher_is_better"])


LAZY = ("bound", "stopped_early", "interval", "refine", "cached")  # early stop, lazily exact (issue 18)
DEPLOYED = ("figures", "measured_on", "pruned", "deploy")  # a trial's deployment figures (nsd/figures.py)


def _new_trial(described: dict[str, Any]) -> dict[str, Any]:
    return {"stage": "config", "fallback": [], **described, "state": TrialState.PENDING.value, "metric": None, "attempt": 1,
            "worker": None, "seconds": None, "error": None, "bound": None, "stopped_early": False, "interval": None,
            "refine": None, "cached": False, "figures": None, "measured_on": None, "pruned": False, "deploy": None}


def metric_text(trial: dict[str, Any]) -> str:
    """A trial's metric for people: the full metric, or the interval a trial that stopped early holds it in
    (`[lo, hi]`, `<=hi` / `>=lo` where unbounded), and where its refine job stands."""
    if trial.get("metric") is not None:
        return _fmt(trial["metric"]) + ("^" if trial.get("refine") == "done" and trial.get("stopped_early") else "")
    interval = trial.get("interval")
    if not interval:
        return "-"
    lo, hi = interval
    text = f"<={_fmt(hi)}" if lo is None else f">={_fmt(lo)}" if hi is None else f"[{lo:.4g},{hi:.4g}]"
    return text + {"waiting": " (refine waits)", "running": " (refining)", "failed": " (refine failed)"}.get(
        trial.get("refine"), "")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def best_so_far(task: dict[str, Any]) -> float | None:
    metrics = [t["metric"] for t in task["trials"] if t.get("metric") is not None]
    if not metrics:
        return None
    return max(metrics) if task["goal"]["higher_is_better"] else min(metrics)


def deploy_text(deploy: dict | None) -> str:
    """`25.0 ms 3.20x 23.1 MB`: a trial's latency per batch (p50), speed-up against the best FP32 form, size."""
    if not deploy:
        return "-"
    speedup = "" if deploy.get("speedup") is None else f" {deploy['speedup']:.2f}x"
    return f"{ms(deploy['latency_ms'])}{speedup} {human_bytes(deploy.get('size_bytes'))}"


def fastest_passing(task: dict[str, Any]) -> dict | None:
    """The deploy summary of the passing trial with the lowest latency so far."""
    measured = [t["deploy"] for t in task["trials"] if t["state"] == TrialState.PASSED and t.get("deploy")]
    return min(measured, key=lambda d: d["latency_ms"], default=None)


def progress_line(task: dict[str, Any], now: float | None = None) -> str:
    trials = task["trials"]
    done = sum(TrialState(t["state"]).finished for t in trials)
    running = sum(t["state"] == TrialState.RUNNING for t in trials)
    started = task["timings"]["started"]
    end = task["timings"]["finished"] or now or time.time()
    elapsed = f"{end - started:.1f}s" if started else "-"
    refining = sum(t.get("refine") in ("waiting", "running") for t in trials)
    running = f"{running} running" + (f", {refining} refining" if refining else "")
    fastest = fastest_passing(task)
    return (f"{task['task_id']} {task['state']:<10} trials {done}/{len(trials)} ({running})  "
            f"baseline {_fmt(task['baseline'])}  best {_fmt(best_so_far(task))}"
            + (f"  fastest passing {deploy_text(fastest)}" if fastest else "") + f"  elapsed {elapsed}")


def result_text(task: dict[str, Any]) -> str:
    lines = [f"task      {task['task_id']} ({task['name']})",
             f"state     {task['state']}" + (f"  met_goal={str(task['met_goal']).lower()}"
                                              if task['met_goal'] is not None else ""),
             f"baseline  {_fmt(task['baseline'])}"]
    fp32 = task.get("baseline_deploy")
    if fp32:
        lines.append(f"fp32      {ms(fp32['latency_ms'])} per batch p50 ({fp32['runtime']}), "
                     f"{human_bytes(fp32.get('size_bytes'))}, {fp32['threads']} thread(s) on cores "
                     f"{','.join(map(str, fp32['cores']))} of {(task.get('baseline_on') or {}).get('cpu', '?')}")
    goal = task["goal"]
    lines.append(f"goal      {goal['criterion']} loss <= {goal['tolerable_loss']:g} "
                 f"({'higher' if goal['higher_is_better'] else 'lower'} is better)")
    objective = task.get("objective") or "first"
    if objective != "first":
        lines.append(f"objective {json.dumps(objective)} (figures within {task.get('objective_margin', 0.05):.0%} "
                     f"of the best tie; the earliest wins)")
    if task["winner"]:
        w = task["winner"]
        lines.append(f"winner    trial {w['index']}: {w['label']}  metric {_fmt(w['metric'])}")
        if w.get("deploy"):
            d = w["deploy"]
            lines.append(f"deployed  {ms(d['latency_ms'])} per batch p50 (p90 {ms(d['p90_ms'])}), "
                         + (f"{d['speedup']:.2f}x FP32, " if d.get("speedup") else "")
                         + f"{human_bytes(d.get('size_bytes'))}"
                         + (f" ({d['size_ratio']:.2f}x FP32)" if d.get("size_ratio") else "")
                         + f", peak memory {human_bytes(d.get('peak_bytes'))}; {d['runtime']}")
        lines.append(f"config    {json.dumps(w['config'], sort_keys=True)}")
        if w.get("fallback"):
            lines.append(f"fp32 ops  {', '.join(w['fallback'])}  (found by the {w.get('stage')} stage)")
    if task["error"]:
        lines.append(f"note      {task['error']}")
    if task.get("artifact"):
        lines.append(f"artifact  {task['artifact']}  (nsd fetch {task['task_id']} -o DIR)")
    t = task["timings"]
    if t["elapsed_s"] is not None:
        plan = "-" if t["plan_s"] is None else f"{t['plan_s']:.2f}"
        base = "" if t.get("baseline_s") is None else f", baseline {t['baseline_s']:.2f}s beside the trials"
        lines.append(f"elapsed   {t['elapsed_s']:.2f}s (plan {plan}s{base}, "
                     f"trials {t['trial_s_total']:.2f}s of work)")
    if task["trials"]:
        lines.append("")
        figures = any(tr.get("deploy") for tr in task["trials"])
        pareto = set(task.get("pareto") or [])
        lines.append(f"{'#':>4}  {'state':<11} {'metric':>10} {'att':>3} {'secs':>6}  {'worker':<16} "
                     + (f"{'latency speed-up size':<26} " if figures else "") + f"{'stage':<11} config")
        for tr in task["trials"]:
            secs = "-" if tr["seconds"] is None else f"{tr['seconds']:.2f}"
            deploy = (f"{deploy_text(tr.get('deploy')) + (' *' if tr['index'] in pareto else ''):<26} "
                      if figures else "")
            lines.append(f"{tr['index']:>4}  {tr['state']:<11} {metric_text(tr):>10} {tr['attempt']:>3} "
                         f"{secs:>6}  {str(tr['worker'] or '-')[:16]:<16} {deploy}{tr.get('stage', 'config'):<11} "
                         f"{tr['label']}")
            if tr["error"] and (tr["state"] == TrialState.ERROR or tr.get("refine") == "failed"):
                lines.append(f"{'':>6}error: {tr['error'].splitlines()[0][:160]}")
            elif tr.get("pruned"):
                lines.append(f"{'':>6}{tr['error']}")
        if any(tr.get("stopped_early") for tr in task["trials"]):
            lines.append("(stopped early: the interval holds its full metric; ^ its full metric from a refine job)")
        if pareto:
            lines.append(f"{'':>6}* the Pareto set: no other trial has both a better metric and a lower "
                         f"{'latency' if objective == 'first' else 'cost'}")
    return "\n".join(lines)


def exit_code(task: dict[str, Any]) -> int:
    """0: done and the goal met; 2: done, goal not met (best config returned); 1: failed or cancelled."""
    if task["state"] != TaskState.DONE:
        return 1
    return 0 if task["met_goal"] else 2


def pair_line(pair: dict) -> str:
    """`nsd cluster`'s line on a broker pair: who serves, and how far behind the other one is."""
    me = f"{pair['role']} {pair['state']} (epoch {pair['epoch']}, {pair['lsn']} transactions)"
    peer = pair.get("peer")
    if not peer:
        return f"brokers: {me}; its peer has not been heard"
    behind = "" if peer.get("behind") is None else f", {peer['behind']} behind"
    whole = "" if peer.get("whole") else ", still catching up"
    return f"brokers: {me}; {peer['role']} {peer['state']}{behind}{whole}, heard {peer['heard_s']:.1f}s ago"
