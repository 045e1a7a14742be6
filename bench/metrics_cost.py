#!/usr/bin/env python
"""What the broker's Prometheus counting costs per trial: prometheus_client (nsd/broker/metrics.py) against
the plain counters and bisect histogram the broker used before it, side by side in this process.

    python bench/metrics_cost.py [--rounds 15] [--trials 20000]

Per trial the broker counts one dispatched job, observes its dispatch latency and counts the trial's final
state; this times exactly that, interleaving the two forms round by round, and prints the medians (and
the spread) in microseconds per trial and their difference. Compare it with the broker's CPU per trial
in `bench/scale.py`'s throughput scenario (broker CPU% × makespan / trials).
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nsd.broker.metrics import LATENCY_BUCKETS, Metrics  # noqa: E402


class PlainMetrics:
    """The baseline: the broker's counters before prometheus_client (ints, a dict, a bisect histogram)."""

    def __init__(self) -> None:
        self.jobs_dispatched, self.trials_finished = 0, {}
        self.counts, self.total, self.n = [0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value
        self.n += 1

    def trial_finished(self, state: str) -> None:
        self.trials_finished[state] = self.trials_finished.get(state, 0) + 1


def plain_round(m: PlainMetrics, trials: int) -> float:
    start = time.perf_counter()
    for i in range(trials):
        m.jobs_dispatched += 1
        m.observe(0.003)
        m.trial_finished("failed_goal")
    return (time.perf_counter() - start) / trials


def prometheus_round(m: Metrics, trials: int) -> float:
    start = time.perf_counter()
    for i in range(trials):
        m.jobs_dispatched.inc()
        m.dispatch_latency.observe(0.003)
        m.trial_finished("failed_goal")
    return (time.perf_counter() - start) / trials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--trials", type=int, default=20_000)
    args = parser.parse_args()
    plain, prom = PlainMetrics(), Metrics()
    a, b = [], []
    plain_round(plain, 1000), prometheus_round(prom, 1000)  # warm-up
    for _ in range(args.rounds):
        a.append(plain_round(plain, args.trials) * 1e6)
        b.append(prometheus_round(prom, args.trials) * 1e6)
    for name, xs in (("plain counters (before)", a), ("prometheus_client", b)):
        print(f"{name:<24} {statistics.median(xs):6.2f} µs/trial  (min {min(xs):.2f}, max {max(xs):.2f}, "
              f"{args.rounds} rounds × {args.trials} trials)")
    print(f"{'difference':<24} {statistics.median(b) - statistics.median(a):6.2f} µs/trial "
          f"(ratio {statistics.median(b) / statistics.median(a):.1f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
