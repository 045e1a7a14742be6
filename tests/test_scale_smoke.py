"""A short run of the scale benchmark (bench/scale.py --quick): the real broker, tens of simulated
workers speaking the real protocol, a few hundred trials. A smoke test of the harness, not a
measurement: it checks that every scenario completes with sane figures and that every process the
harness started is gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, _alive

pytestmark = pytest.mark.slow


def test_scale_benchmark_quick(tmp_path: Path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--max-s", "20",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    results = {r["scenario"]: r for r in report["results"]}
    assert set(results) == {"throughput", "makespan", "latency", "idle"}

    for name in ("throughput", "makespan", "latency"):
        r = results[name]
        assert not r["timed_out"], r
        assert r["task_state"] == "done" and r["artifact"], r  # saved by a simulated worker
        assert r["met_goal"] is False and r["winner"] == 0  # no trial meets the goal: every trial ran
        assert r["trials_total"] == r["trials"] == r["trials_completed"] == r["trial_results"], r
        assert r["plan_jobs"] == 1 and r["save_jobs"] == 1
        assert r["workers_registered"] == r["workers"]
        assert r["completed_per_s"] > 0 and r["dispatched_per_s"] > 0 and r["makespan_s"] > 0
        assert r["latency_n"] > 0 and 0 <= r["latency_p50_ms"] <= r["latency_p99_ms"] and r["latency_p99_ms"] > 0
        assert r["broker_cpu_pct"] > 0 and r["broker_rss_mb"] > 0
        assert r["disconnects"] == 0 and r["send_errors"] == 0 and r["declared_dead"] == 0
    for name in ("makespan", "latency"):  # trials with a length: no faster than the ideal (timer slack aside)
        assert results[name]["makespan_ratio"] >= 0.95

    idle = results["idle"]
    assert idle["workers_registered"] == idle["workers_at_end"] == idle["workers"]
    assert idle["broker_cpu_pct"] > 0 and idle["broker_rss_mb"] > 0
    assert idle["hb_sent_per_s"] > 0 and idle["hb_received_per_s"] > 0 and idle["disconnects"] == 0

    assert "throughput" in proc.stdout and "idle" in proc.stdout  # the printed table
    assert report["started_pids"] and all(r["processes_gone"] for r in report["results"])
    assert not [pid for pid in report["started_pids"] if _alive(pid)]
