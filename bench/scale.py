#!/usr/bin/env python
"""Scale benchmark: the real broker against hundreds of simulated workers.

    python bench/scale.py                      # every scenario at full size (a few minutes)
    python bench/scale.py --quick              # every scenario, small (the CI smoke test)
    python bench/scale.py --scenario idle --workers 1000 --idle-s 30 --json out.json
    python bench/scale.py --scenario throughput,latency --pair both   # a single broker, then a broker pair

The broker runs as it does in production (`python -m nsd broker`, a subprocess, its own state dir).
Simulated workers are DEALER sockets speaking the real protocol (nsd.protocol): READY with their slots,
HEARTBEAT as a real worker sends it (nsd.liveness), a RESULT for every ASSIGN. Several hundred of them share one simulator
process (asyncio + uvloop, one socket each, identity = worker id); a plan job answers with N configs,
a trial sleeps `trial_s` without blocking (a timer) and reports metric 0.0 against baseline 1.0 with
tolerable_loss 0.01, so no trial meets the goal and every trial runs; the save job uploads a tiny
artifact (STORE) and reports it. Tasks go in through the real client (nsd.client.AsyncClient).

Scenarios:
  throughput  zero-length trials: trials dispatched and completed per second (the broker's ceiling)
  makespan    thousands of short trials on ~200 slots: makespan against total trial time / slots
  latency     p50/p99 from a slot freeing (its RESULT sent) to its next ASSIGN arriving
  idle        1,000 connected, heartbeating, idle workers: broker CPU % and memory

Every scenario measures slot-free -> next-ASSIGN latency and broker CPU; `latency` is the one with
realistic trials: 1 s +- 20 % (trials that all end at the same instant measure the burst instead: use
--jitter 0 to see it). Every process this starts is killed by PID at the end, error or Ctrl-C
included; simulators also exit when their stdin closes and (Linux) when this process dies.

The parts: the simulated workers are bench/scale_sim.py (a process of their own), the processes this
starts and what it reads of them in /proc are bench/scale_procs.py; this file is the scenarios, their
runs and the table.

All processes share this machine's cores: the simulators compete with the broker for CPU, which the
table's `sim CPU` column shows. `--profile DIR` runs the broker under py-spy (if installed) or cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/scale.py` from anywhere
    sys.path.insert(0, str(ROOT))

from scale_procs import ALL_STARTED, Cluster, alive, kill_everything, percentile, proc_usage, raise_nofile  # noqa: E402

TERMINAL = ("done", "failed", "cancelled")

# ---- scenarios -------------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    workers: int
    slots: int = 1  # per worker
    trials: int = 0  # 0: no task (idle)
    trial_s: float = 0.0
    jitter: float = 0.0  # each trial sleeps trial_s * (1 +- jitter), uniformly
    idle_s: float = 0.0

    @property
    def total_slots(self) -> int:
        return self.workers * self.slots


FULL = {
    "throughput": Scenario("throughput", workers=100, slots=2, trials=3000, trial_s=0.0),
    "makespan": Scenario("makespan", workers=200, slots=1, trials=4000, trial_s=0.1),
    "latency": Scenario("latency", workers=500, slots=1, trials=2500, trial_s=1.0, jitter=0.2),
    "idle": Scenario("idle", workers=1000, idle_s=30.0),
}
QUICK = {
    "throughput": Scenario("throughput", workers=20, slots=2, trials=300, trial_s=0.0),
    "makespan": Scenario("makespan", workers=20, slots=1, trials=200, trial_s=0.05),
    "latency": Scenario("latency", workers=30, slots=1, trials=120, trial_s=0.2, jitter=0.2),
    "idle": Scenario("idle", workers=50, idle_s=3.0),
}

async def run_scenario(sc: Scenario, args, pair: bool = False) -> dict[str, Any]:
    from nsd.client.api import AsyncClient

    result: dict[str, Any] = {"scenario": sc.name + ("+pair" if pair else ""), **asdict(sc), "total_slots": sc.total_slots,
                              "loadavg_before": os.getloadavg()[0]}
    scratch = Path(tempfile.mkdtemp(prefix=f"nsd-scale-{sc.name}-"))
    cluster = Cluster(scratch, args.heartbeat, args.profile, sc.name, pair)
    client = None
    try:
        await cluster.start_broker()
        if pair:
            client = AsyncClient(cluster.endpoints["clients"], timeout_s=120)
            await cluster.settled(client)
        result["broker_pid"] = cluster.broker_pid
        base = proc_usage(cluster.broker_pid)
        result["broker_rss_start_mb"] = round(base["rss"] / 2**20, 1)
        t_reg = time.monotonic()
        await cluster.start_sims(sc, args.per_sim, sc.trials)
        result["register_s"] = round(time.monotonic() - t_reg, 2)
        result["sim_pids"] = [s.pid for s in cluster.sims]
        result["simulators"] = len(cluster.sims)
        client = client or AsyncClient(cluster.endpoints["clients"], timeout_s=120)
        workers = await client.cluster()
        result["workers_registered"] = len(workers)
        backup0 = proc_usage(cluster.backup.pid) if pair else None
        if sc.trials:
            await _run_task(sc, cluster, client, result, args.max_s)
        else:
            await _run_idle(sc, cluster, client, result)
        if backup0 is not None:  # what the copy costs the other head
            backup1 = proc_usage(cluster.backup.pid)
            result["backup_cpu_pct"] = round(100 * (backup1["cpu_s"] - backup0["cpu_s"]) / (backup1["t"] - backup0["t"]), 1)
        # Anything nsd did that it should not have, under this load:
        text = cluster.log_path.read_text(errors="replace")
        result["broker_log_warnings"] = sum(1 for line in text.splitlines()
                                            if " WARNING " in line or " ERROR " in line or "Traceback" in line)
        result["declared_dead"] = text.count("declared dead")
    finally:
        if client is not None:
            await client.close()
        await cluster.close()
        if args.keep_scratch:
            result["scratch"] = str(scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()[0]
    result["processes_gone"] = not any(alive(p) for p in [cluster.broker_pid, *result.get("sim_pids", [])])
    return result


async def _probe(endpoint: str, rtts: list[float], pending: list[float]) -> None:
    """A client asking HELLO (the cheapest request) every 0.2 s: how long do clients wait under load?"""
    from nsd.client.api import AsyncClient

    client = AsyncClient(endpoint, timeout_s=3600)
    try:
        while True:
            t = time.monotonic()
            pending[:] = [t]
            await client.hello()
            rtts.append(time.monotonic() - t)
            pending.clear()
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def _run_task(sc: Scenario, cluster: Cluster, client, result: dict, max_s: float) -> None:
    from nsd.client.api import AsyncClient, BrokerUnavailable

    spec = {"name": f"scale-{sc.name}", "recipe": {"kind": "python", "file": str(Path(__file__).resolve())},
            "tuning": {"config_set": [{"rtn": {"sim_i": list(range(sc.trials))}}], "tolerable_loss": 0.01,
                       "max_trials": sc.trials},
            "resources": {"workers": 0}}
    await cluster.sims_command("reset", "reset")
    u0 = proc_usage(cluster.broker_pid)
    t_submit = time.monotonic()
    task_id = await client.submit(spec)
    rtts: list[float] = []
    pending: list[float] = []
    probe = asyncio.create_task(_probe(cluster.endpoints["clients"], rtts, pending))
    # Progress comes from the simulators (a saturated broker may not answer clients for a long time);
    # the save job is the task's last step. Quiet spells also ask the broker (the plan may have failed).
    quick = AsyncClient(cluster.endpoints["clients"], timeout_s=2)
    timed_out, last_results, quiet_since = False, -1, time.monotonic()
    try:
        while True:
            await asyncio.sleep(0.1)
            prog = await cluster.sims_command("progress", "progress")
            done_results = sum(p["trial_results"] for p in prog)
            if sum(p["save_jobs"] for p in prog):
                break
            now = time.monotonic()
            if done_results != last_results:
                last_results, quiet_since = done_results, now
            elif now - quiet_since > 2:
                quiet_since = now
                with contextlib.suppress(BrokerUnavailable):
                    if next(t for t in await quick.list() if t["task_id"] == task_id)["state"] in TERMINAL:
                        break
            if now - t_submit > max_s:
                timed_out = True
                break
    finally:
        await quick.close()
    t_saved = time.monotonic()
    u1 = proc_usage(cluster.broker_pid)
    stuck = [t_saved - pending[0]] if pending else []
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    reports = await cluster.sims_command("report", "report")
    result["timed_out"] = timed_out
    task = None
    if not timed_out:
        state = "?"
        while state not in TERMINAL:
            state = next(t for t in await client.list() if t["task_id"] == task_id)["state"]
            await asyncio.sleep(0.05)
        task = await client.result(task_id)
    t_done = time.monotonic()

    assigns = sum(r["trial_assigns"] for r in reports)
    results = sum(r["trial_results"] for r in reports)
    first_assign = min((r["first_assign"] for r in reports if r["first_assign"] is not None), default=None)
    last_assign = max((r["last_assign"] for r in reports if r["last_assign"] is not None), default=None)
    last_result = max((r["last_result"] for r in reports if r["last_result"] is not None), default=None)
    lat = sorted(x for r in reports for x in r["latencies"])
    rtt = sorted(rtts + stuck)
    makespan = (last_result - first_assign) if first_assign is not None and last_result is not None else None
    # Ideal: every slot busy from the first assignment to the last result (total trial time / slots).
    ideal = (sum(r["busy_s"] for r in reports) if sc.jitter else sc.trials * sc.trial_s) / sc.total_slots
    if task is not None:
        trials = task["trials"]
        completed = sum(1 for t in trials if t["state"] in ("passed", "failed_goal"))
        result.update({"task_state": task["state"], "met_goal": task["met_goal"],
                       "winner": (task["winner"] or {}).get("index"), "artifact": bool(task["artifact"]),
                       "trials_total": len(trials), "broker_elapsed_s": task["timings"]["elapsed_s"]})
    else:
        completed = results
    result.update({
        "trials_completed": completed, "trial_assigns": assigns, "trial_results": results,
        "plan_jobs": sum(r["plan_jobs"] for r in reports), "save_jobs": sum(r["save_jobs"] for r in reports),
        "cancels": sum(r["cancels"] for r in reports), "disconnects": sum(r["disconnects"] for r in reports),
        "send_errors": sum(r["send_errors"] for r in reports),
        "submit_to_done_s": round(t_done - t_submit, 3), "submit_to_save_s": round(t_saved - t_submit, 3),
        "makespan_s": None if makespan is None else round(makespan, 3), "ideal_s": round(ideal, 3),
        "makespan_ratio": round(makespan / ideal, 3) if makespan and ideal > 0 and not timed_out else None,
        # Gave up before the end: the makespan is at least this many times the ideal.
        "makespan_ratio_at_least": round((t_saved - first_assign) / ideal, 1)
        if timed_out and first_assign is not None and ideal > 0 else None,
        "completed_per_s": round(results / makespan, 1) if makespan else None,
        "dispatched_per_s": round(assigns / (last_assign - first_assign), 1)
        if last_assign is not None and last_assign > first_assign else None,
        "latency_n": len(lat),
        "latency_p50_ms": _ms(percentile(lat, 0.50)), "latency_p99_ms": _ms(percentile(lat, 0.99)),
        "latency_max_ms": _ms(lat[-1] if lat else None),
        "client_rtt_n": len(rtt), "client_rtt_p50_ms": _ms(percentile(rtt, 0.5)),
        "client_rtt_max_ms": _ms(rtt[-1] if rtt else None),
        "max_broker_silence_s": max(r["max_broker_silence_s"] for r in reports),
        "broker_cpu_pct": round(100 * (u1["cpu_s"] - u0["cpu_s"]) / (u1["t"] - u0["t"]), 1),
        "broker_rss_mb": round(u1["rss"] / 2**20, 1), "broker_peak_rss_mb": round(u1["peak_rss"] / 2**20, 1),
        "sim_cpu_pct": round(100 * sum(r["cpu_s"] for r in reports) / max(r["wall_s"] for r in reports), 1),
    })


async def _run_idle(sc: Scenario, cluster: Cluster, client, result: dict) -> None:
    await asyncio.sleep(min(3.0, sc.idle_s / 3))  # let registration traffic settle
    await cluster.sims_command("reset", "reset")
    u0 = proc_usage(cluster.broker_pid)
    await asyncio.sleep(sc.idle_s)
    u1 = proc_usage(cluster.broker_pid)
    reports = await cluster.sims_command("report", "report")
    workers = await client.cluster()
    span = u1["t"] - u0["t"]
    result.update({
        "idle_measured_s": round(span, 1), "workers_at_end": len(workers),
        "broker_cpu_pct": round(100 * (u1["cpu_s"] - u0["cpu_s"]) / span, 2),
        "broker_rss_mb": round(u1["rss"] / 2**20, 1), "broker_peak_rss_mb": round(u1["peak_rss"] / 2**20, 1),
        "hb_sent_per_s": round(sum(r["hb_sent"] for r in reports) / span, 1),
        "hb_received_per_s": round(sum(r["hb_received"] for r in reports) / span, 1),
        "disconnects": sum(r["disconnects"] for r in reports),
        "max_broker_silence_s": max(r["max_broker_silence_s"] for r in reports),
        "sim_cpu_pct": round(100 * sum(r["cpu_s"] for r in reports) / max(r["wall_s"] for r in reports), 1),
    })


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def render(results: list[dict]) -> str:
    cols = [("scenario", "scenario"), ("workers", "workers"), ("total_slots", "slots"), ("trials", "trials"),
            ("trial_s", "trial s"), ("completed_per_s", "done/s"), ("dispatched_per_s", "dispatch/s"),
            ("makespan_s", "makespan s"), ("ideal_s", "ideal s"), ("makespan_ratio", "ratio"),
            ("latency_p50_ms", "p50 ms"), ("latency_p99_ms", "p99 ms"), ("broker_cpu_pct", "broker CPU%"),
            ("broker_rss_mb", "broker RSS MB"), ("backup_cpu_pct", "backup CPU%"), ("client_rtt_max_ms", "client wait max ms"),
            ("max_broker_silence_s", "max silence s"), ("sim_cpu_pct", "sim CPU%")]
    def cell(r: dict, k: str) -> str:
        if k == "makespan_ratio" and r.get("makespan_ratio_at_least") is not None:
            return f">{r['makespan_ratio_at_least']}"
        if k == "scenario" and r.get("timed_out"):
            return f"{r[k]} (gave up after {r['submit_to_save_s']:.0f}s)"
        return "-" if r.get(k) is None else str(r.get(k))

    rows = [[h for _, h in cols]] + [[cell(r, k) for k, _ in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def amain(args) -> list[dict]:
    table = QUICK if args.quick else FULL
    names = list(table) if args.scenario == "all" else args.scenario.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {list(table)}")
    main_task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job may have inherited it ignored
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    results = []
    for name in names:
        sc = table[name]
        overrides = {k: getattr(args, k) for k in ("workers", "slots", "trials", "trial_s", "jitter", "idle_s")
                     if getattr(args, k) is not None}
        sc = replace(sc, **overrides)
        print(f"# {name}: {sc.workers} workers x {sc.slots} slots, "
              + (f"{sc.trials} trials of {sc.trial_s:g}s" if sc.trials else f"idle {sc.idle_s:g}s"),
              file=sys.stderr, flush=True)
        for pair in {"off": (False,), "on": (True,), "both": (False, True)}[args.pair]:
            r = await run_scenario(sc, args, pair)
            results.append(r)
            brief = {k: r.get(k) for k in ("completed_per_s", "dispatched_per_s", "makespan_ratio", "latency_p50_ms",
                                           "latency_p99_ms", "broker_cpu_pct", "backup_cpu_pct", "broker_rss_mb")
                     if r.get(k) is not None}
            print(f"#   {'pair' if pair else 'single'}: {brief}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="all", help="all, or a comma list of: " + ", ".join(FULL))
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the harness (CI)")
    p.add_argument("--workers", type=int, help="simulated workers (overrides the scenario's)")
    p.add_argument("--slots", type=int, help="slots per simulated worker")
    p.add_argument("--trials", type=int, help="trials in the task (the simulated plan's length)")
    p.add_argument("--trial-s", type=float, help="seconds each trial sleeps")
    p.add_argument("--jitter", type=float, help="trial lengths vary uniformly by +- this fraction")
    p.add_argument("--idle-s", type=float, help="seconds the idle scenario measures")
    p.add_argument("--per-sim", type=int, default=200, help="simulated workers per simulator process")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval, both ways")
    p.add_argument("--max-s", type=float, default=300.0,
                   help="give up on a task scenario after this long (partial figures are reported)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--profile", type=Path, help="profile the broker (py-spy if installed, else cProfile) into DIR")
    p.add_argument("--keep-scratch", action="store_true", help="keep each broker's state dir and log")
    p.add_argument("--pair", choices=("off", "on", "both"), default="off",
                   help="a broker pair (primary + backup, every commit confirmed by the backup); both: each "
                        "scenario with a single broker, then with a pair, side by side")
    args = p.parse_args(argv)
    raise_nofile()  # inherited by the broker
    try:
        results = asyncio.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        kill_everything()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        kill_everything()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                         "started_pids": ALL_STARTED, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
