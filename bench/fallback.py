"""The fallback search on the real MiniLM: wall time with N workers against the sum of its trial times (the
sequential time), and the wall time to expect on more cores from the stage sizes.

    python bench/fallback.py                        # bench/minilm/fallback.toml, 2 workers
    python bench/fallback.py --workers 2 --json /tmp/fallback.json

The model of a distributed run: stages run one after another (a stage's content depends on the one before);
within a stage, trials run `slots` at a time. Expected wall on S one-core slots =
plan + sum over phases of ceil(n_phase / S) x (mean trial time of the phase), where the phases are the
config set, block-wise + op-wise (dispatched together once `best` is known), and accumulated; n_phase is
the trials of the phase the sequential procedure runs (up to the winner). With S >= 36 every phase is one
trial long. Trial times are the ones this run measured, on one core each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("LOGLEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsd.client.specs import prepare_spec, read_spec  # noqa: E402
from nsd.local import run_local  # noqa: E402

PHASES = (("config",), ("block-wise", "op-wise"), ("accumulated",))


def expected_wall(trials: list[dict], winner: int, plan_s: float, slots: int) -> float:
    """The model above, over the trials at or below the winner (what the sequential procedure needs)."""
    needed = [t for t in trials[: winner + 1]]
    total = plan_s
    for phase in PHASES:
        times = [t["seconds"] for t in needed if t["stage"] in phase and t["seconds"] is not None]
        n = sum(t["stage"] in phase for t in needed)
        if n:
            mean = sum(times) / len(times) if times else 0.0
            total += math.ceil(n / slots) * mean
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(Path(__file__).with_name("minilm") / "fallback.toml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    spec = prepare_spec(read_spec(str(Path(args.spec).resolve())))
    t0 = time.perf_counter()
    task = asyncio.run(run_local(spec, workers=args.workers))
    wall = time.perf_counter() - t0
    trials, winner = task["trials"], task["winner"]
    if winner is None:
        print(f"task ended {task['state']}: {task['error']}", file=sys.stderr)
        return 1
    w = winner["index"]
    timed = [t for t in trials if t["seconds"] is not None]
    sequential = sum(t["seconds"] for t in trials[: w + 1] if t["seconds"] is not None)  # one at a time
    plan_s = task["timings"]["plan_s"] or 0.0
    stages = Counter(t["stage"] for t in trials)
    needed = Counter(t["stage"] for t in trials[: w + 1])
    report = {
        "spec": args.spec, "workers": args.workers, "cpus": os.cpu_count(),
        "baseline": task["baseline"], "met_goal": task["met_goal"], "winner": w, "winner_stage": winner["stage"],
        "winner_fallback": winner["fallback"], "winner_metric": winner["metric"],
        "trials_created": dict(stages), "trials_needed": dict(needed),
        "trials_scored": sum(t["state"] in ("passed", "failed_goal") for t in trials),
        "trials_cancelled": sum(t["state"] == "cancelled" for t in trials),
        "wall_s": wall, "tuning_s": task["timings"]["elapsed_s"], "plan_s": plan_s,
        "trial_s_total": sum(t["seconds"] for t in timed), "sequential_s": plan_s + sequential,
        "mean_trial_s": sum(t["seconds"] for t in timed) / max(1, len(timed)),
        "expected_s": {str(s): expected_wall(trials, w, plan_s, s) for s in (args.workers, 16, 64)},
    }
    print(f"{task['name']}: baseline {task['baseline']:.6g}, winner #{w} ({winner['stage']}, "
          f"{len(winner['fallback'])} ops in FP32) metric {winner['metric']:.6g}, met_goal {task['met_goal']}")
    print(f"trials created {dict(stages)}; needed by the sequential procedure {dict(needed)}; "
          f"scored {report['trials_scored']}, cancelled {report['trials_cancelled']}")
    print(f"wall {wall:.1f}s with {args.workers} workers (tuning {report['tuning_s']:.1f}s, plan {plan_s:.1f}s); "
          f"sequential (plan + the needed trials' times) {report['sequential_s']:.1f}s; all trial work "
          f"{report['trial_s_total']:.1f}s; mean trial {report['mean_trial_s']:.2f}s")
    print("expected wall from the stage sizes: " + ", ".join(f"{s} slots {v:.1f}s"
                                                              for s, v in report["expected_s"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
