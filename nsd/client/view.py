"""Pure helpers over task views: fold events into a snapshot, and render views for people."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from nsd.states import TaskState, TrialState


def apply_event(task: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """The task view after one event (a new dict; a snapshot event replaces the view)."""
    if event["kind"] == "snapshot":
        return copy.deepcopy(event["task"])
    task = copy.deepcopy(task)
    task["seq"] = event["seq"]
    if event["kind"] == "state":
        task["state"] = event["state"]
        for key in ("met_goal", "error"):
            if key in event:
                task[key] = event[key]
        if event.get("winner") is not None:
            w = task["trials"][event["winner"]]
            task["winner"] = {k: w.get(k) for k in ("index", "config", "label", "stage", "fallback", "metric")}
    elif event["kind"] == "plan":
        task["baseline"] = event["baseline"]
        task["trials"] = [_new_trial(t) for t in event["trials"]]
    elif event["kind"] == "stage":  # the fallback search added a stage's trials
        task["trials"] = task["trials"] + [_new_trial(t) for t in event["trials"]]
    elif event["kind"] == "trial":
        trial = task["trials"][event["index"]]
        trial.update({k: event[k] for k in ("state", "metric", "attempt", "worker", "seconds", "error")})
    return task


def _new_trial(described: dict[str, Any]) -> dict[str, Any]:
    return {"stage": "config", "fallback": [], **described, "state": TrialState.PENDING.value, "metric": None, "attempt": 1,
            "worker": None, "seconds": None, "error": None}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def best_so_far(task: dict[str, Any]) -> float | None:
    metrics = [t["metric"] for t in task["trials"] if t.get("metric") is not None]
    if not metrics:
        return None
    return max(metrics) if task["goal"]["higher_is_better"] else min(metrics)


def progress_line(task: dict[str, Any], now: float | None = None) -> str:
    trials = task["trials"]
    done = sum(TrialState(t["state"]).finished for t in trials)
    running = sum(t["state"] == TrialState.RUNNING for t in trials)
    started = task["timings"]["started"]
    end = task["timings"]["finished"] or now or time.time()
    elapsed = f"{end - started:.1f}s" if started else "-"
    return (f"{task['task_id']} {task['state']:<10} trials {done}/{len(trials)} ({running} running)  "
            f"baseline {_fmt(task['baseline'])}  best {_fmt(best_so_far(task))}  elapsed {elapsed}")


def result_text(task: dict[str, Any]) -> str:
    lines = [f"task      {task['task_id']} ({task['name']})",
             f"state     {task['state']}" + (f"  met_goal={str(task['met_goal']).lower()}"
                                              if task['met_goal'] is not None else ""),
             f"baseline  {_fmt(task['baseline'])}"]
    goal = task["goal"]
    lines.append(f"goal      {goal['criterion']} loss <= {goal['tolerable_loss']:g} "
                 f"({'higher' if goal['higher_is_better'] else 'lower'} is better)")
    if task["winner"]:
        w = task["winner"]
        lines.append(f"winner    trial {w['index']}: {w['label']}  metric {_fmt(w['metric'])}")
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
        lines.append(f"elapsed   {t['elapsed_s']:.2f}s (plan {plan}s, "
                     f"trials {t['trial_s_total']:.2f}s of work)")
    if task["trials"]:
        lines.append("")
        lines.append(f"{'#':>4}  {'state':<11} {'metric':>10} {'att':>3} {'secs':>6}  {'worker':<16} "
                     f"{'stage':<11} config")
        for tr in task["trials"]:
            secs = "-" if tr["seconds"] is None else f"{tr['seconds']:.2f}"
            lines.append(f"{tr['index']:>4}  {tr['state']:<11} {_fmt(tr['metric']):>10} {tr['attempt']:>3} "
                         f"{secs:>6}  {str(tr['worker'] or '-')[:16]:<16} {tr.get('stage', 'config'):<11} "
                         f"{tr['label']}")
            if tr["state"] == TrialState.ERROR and tr["error"]:
                lines.append(f"{'':>6}error: {tr['error'].splitlines()[0][:160]}")
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
