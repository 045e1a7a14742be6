"""Deployment figures, the pure parts: the statistics and the timing loop (`nsd.quant.measure`), what figures
say and cost under an objective (`nsd.figures`), the worker's hardware (`nsd.worker.hardware`) and the
spec's objective fields. No torch, no sockets."""

from __future__ import annotations

import copy
import itertools
import random

import pytest

from nsd import figures as F
from nsd.quant import measure
from nsd.spec import SpecError, validate
from nsd.worker.hardware import ISA_FLAGS, describe, parse_cpuinfo


def test_percentiles_interpolate_between_ranks_like_numpy():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert measure.percentile(samples, 50) == 3.0
    assert measure.percentile(samples, 0) == 1.0 and measure.percentile(samples, 100) == 5.0
    assert measure.percentile(samples, 90) == pytest.approx(4.6)
    assert measure.percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError):
        measure.percentile([], 50)
    assert measure.spread([2.0] * 9) == 0.0
    assert measure.spread([1.0, 2.0, 3.0]) == pytest.approx((2.8 - 1.2) / 2.0)


def test_timing_warms_up_then_repeats_until_the_spread_is_small():
    clock = itertools.count(0.0, 0.001)  # every reading 1 ms later: each call "takes" 1 ms
    calls = []
    samples = measure.time_calls(lambda: calls.append(1), measure.Policy(warmup=2, min_repeats=5, budget_s=10),
                                 clock=lambda: next(clock))
    assert len(calls) == 2 + len(samples) and len(samples) == 5  # settled at once: no spread
    assert all(s == pytest.approx(0.001) for s in samples)


def test_timing_stops_at_the_budget_when_the_spread_stays_large():
    now = [0.0]
    durations = itertools.cycle([0.01, 0.05])  # a noisy neighbour: the spread never settles

    def clock():
        return now[0]

    def call():
        now[0] += next(durations)

    policy = measure.Policy(warmup=1, min_repeats=3, max_repeats=10_000, budget_s=1.0, target_spread=0.05)
    samples = measure.time_calls(call, policy, clock=clock)
    assert 1.0 <= sum(samples) < 1.1 and measure.spread(samples) > 0.05
    assert len(measure.time_calls(call, measure.Policy(warmup=0, min_repeats=3, max_repeats=7, budget_s=99,
                                                       target_spread=0.0), clock=clock)) == 7  # the cap


def test_summary_gives_latency_per_batch_and_throughput():
    s = measure.summary([0.010, 0.012, 0.011, 0.010, 0.030], batch=8)
    assert s["p50_ms"] == pytest.approx(11.0) and s["repeats"] == 5
    assert s["throughput"] == pytest.approx(8 / 0.011)


def test_peak_memory_sees_what_was_allocated_after_the_start(tmp_path):
    memory = measure.PeakMemory()
    memory.start()
    if memory.base_kib is None:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident
    peak = memory.peak_bytes()
    del block
    assert peak >= 60 * 1024 * 1024
    memory.start()  # freed and trimmed: a new start does not carry the old peak
    assert memory.peak_bytes() < 32 * 1024 * 1024
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 5)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert measure.tree_bytes([str(tmp_path)]) == 15


# ---- what figures say --------------------------------------------------------------------------------


def form(p50: float, throughput: float | None = None, run_bytes: int | None = 1000, name: str = "x") -> dict:
    return {"form": name, "runtime": "eager", "p50_ms": p50, "p90_ms": p50 * 1.1, "spread": 0.02, "repeats": 10,
            "throughput": throughput if throughput is not None else 8000.0 / p50, "batch": 8, "load_s": 0.1,
            "compile_s": None, "peak_bytes": 2000, "run_bytes": run_bytes, "cores": [0], "threads": 1,
            "exclusive": True, "paused": 0, "note": None}


def figs(*forms: dict, size: int | None = 100) -> dict:
    return {"size_bytes": size, "size_of": "t", "forms": list(forms), "input": {"names": [], "shapes": []},
            "notes": []}


def test_the_fastest_form_counts_and_speed_ups_are_against_the_best_fp32():
    fp32 = figs(form(80.0, name="fp32-eager"), form(60.0, name="fp32-compiled"), size=400)
    int8 = figs(form(20.0, name="int8-compiled"), size=100)
    assert F.best_form(fp32)["form"] == "fp32-compiled"
    s = F.summary(int8, fp32)
    assert s["speedup"] == pytest.approx(3.0) and s["size_ratio"] == pytest.approx(0.25)
    assert F.summary(None, fp32) is None and F.summary(int8)["speedup"] is None


def test_costs_and_weighted_objectives():
    fp32 = figs(form(100.0), size=400)
    a = figs(form(50.0, run_bytes=500), size=100)
    assert F.cost(a, "first") is None and F.weights("first") == {}
    assert F.cost(a, "latency") == 50.0 and F.cost(a, "size") == 100.0 and F.cost(a, "memory") == 500.0
    assert F.cost(a, "throughput") == pytest.approx(50.0 / 8000)
    assert F.cost(a, {"latency": 0.7, "size": 0.3}, fp32) == pytest.approx(0.7 * 0.5 + 0.3 * 0.25)
    assert F.cost(a, {"latency": 0.7, "size": 0.3}) is None  # weights need the FP32 figures to add up
    assert F.cost(figs(form(1.0), size=None), "size") is None
    assert F.ties(104.0, 100.0, 0.05) and not F.ties(106.0, 100.0, 0.05)
    prune = {"objective": "latency", "best": 40.0, "margin": 0.05, "baseline": None}
    assert F.loses(a, prune) and not F.loses(a, {**prune, "best": 48.0})
    assert not F.loses(figs(size=None), {**prune, "objective": "size"})  # a figure not taken never loses


def test_pareto_set_matches_a_brute_force_reference_on_random_points():
    rng = random.Random(7)
    for _ in range(300):
        points = [(i, rng.choice([0.9, 0.95, 1.0, rng.random()]), rng.choice([1.0, 2.0, rng.random()]))
                  for i in range(rng.randint(1, 8))]
        expected = [i for i, m, c in points
                    if not any(m2 >= m and c2 <= c and (m2, c2) != (m, c) for _, m2, c2 in points)]
        assert F.pareto(points) == expected


def test_bytes_for_people():
    assert F.human_bytes(None) == "-" and F.human_bytes(512) == "512 B"
    assert F.human_bytes(91_700_000) == "91.7 MB" and F.human_bytes(3e12) == "3000.0 GB"


# ---- the worker's hardware ---------------------------------------------------------------------------

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16 avx512_bf16
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""


def test_hardware_comes_from_cpuinfo(tmp_path):
    model, isa = parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert isa == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    assert parse_cpuinfo("") == ("unknown", [])
    assert describe(4, "spr", cpuinfo=str(tmp_path / "absent")) == {"cpu": "unknown", "cores": 4, "isa": [],
                                                                    "label": "spr"}
    here = describe(2, None)
    assert set(here["isa"]) <= set(ISA_FLAGS) and here["cores"] == 2


# ---- the spec's fields -------------------------------------------------------------------------------

BASE = {"model": {"path": "/m", "shared": True}, "recipe": {"kind": "python", "file": "/r.py"},
        "tuning": {"config_set": [{"rtn": {}}]}}


def spec_with(**tuning) -> dict:
    raw = copy.deepcopy(BASE)
    raw["tuning"].update(tuning)
    return raw


def test_objectives_default_to_inc_and_take_weights():
    t = validate(BASE).tuning
    assert (t.objective, t.objective_margin, t.measure, t.measure_budget_s) == ("first", 0.05, "passing", 3.0)
    assert validate(spec_with(objective="latency")).tuning.objective == "latency"
    assert validate(spec_with(objective={"latency": 0.7, "size": 0.3})).tuning.objective == {"latency": 0.7,
                                                                                             "size": 0.3}
    spec = validate(spec_with(objective={"latency": 1})).to_dict()
    assert validate(spec).to_dict() == spec


@pytest.mark.parametrize("tuning, message", [
    ({"objective": "fastest"}, "tuning.objective: unknown objective 'fastest'"),
    ({"objective": {"speed": 1}}, "tuning.objective.speed: unknown figure"),
    ({"objective": {"latency": 0}}, "tuning.objective.latency: a weight must be a positive number"),
    ({"objective": {"latency": True}}, "tuning.objective.latency: a weight must be a positive number"),
    ({"objective": {}}, "tuning.objective: must be one of first"),
    ({"objective": ["latency"]}, "tuning.objective: must be one of first"),
    ({"objective": "size", "measure": "none"}, "tuning.measure: the objective 'size' ranks trials"),
    ({"measure": "some"}, "tuning.measure: must be one of passing, all, none"),
    ({"objective_margin": 2}, "tuning.objective_margin: must be between 0.0 and 1.0"),
    ({"measure_budget_s": -1}, "tuning.measure_budget_s: must be between"),
])
def test_bad_objectives_get_one_clear_line(tuning, message):
    with pytest.raises(SpecError) as exc:
        validate(spec_with(**tuning))
    assert len(exc.value.problems) == 1 and exc.value.problems[0].startswith(message), exc.value.problems


def test_a_hardware_label_is_a_plain_name():
    raw = copy.deepcopy(BASE) | {"resources": {"hardware": "spr-64"}}
    assert validate(raw).resources.hardware == "spr-64"
    for bad in ("a b", "../x", "", "x" * 65, 3):
        with pytest.raises(SpecError, match="resources.hardware"):
            validate(copy.deepcopy(BASE) | {"resources": {"hardware": bad}})
