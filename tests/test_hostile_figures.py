"""Deployment figures from the wire: a worker's RESULT `figures` and READY `hardware`, and a broker's `prune` in
a trial job, are checked field by field before anything stores, caches or shows them (exact shapes, unknown
keys refused, bounded sizes, finite numbers)."""

from __future__ import annotations

import copy
import random

import pytest

from nsd.protocol import WORKER_TO_BROKER, Cmd, ProtocolError, pack, unpack
from nsd.worker import checks

FORM = {"form": "int8-compiled", "runtime": "torch.compile (inductor, freezing)", "p50_ms": 25.0, "p90_ms": 27.5,
        "spread": 0.08, "repeats": 40, "throughput": 320.0, "batch": 8, "load_s": 0.4, "compile_s": 12.0,
        "peak_bytes": 200_000_000, "run_bytes": 90_000_000, "cores": [0, 1], "threads": 2, "exclusive": True,
        "paused": 1, "note": None}
FIGURES = {"size_bytes": 23_000_000, "size_of": "the saved artifact", "forms": [FORM],
           "input": {"names": ["input_ids", "attention_mask"], "shapes": [[8, 32], [8, 32]]}, "notes": []}
HARDWARE = {"cpu": "Intel(R) Xeon(R) Platinum 8480+", "cores": 56, "isa": ["avx512_vnni", "amx_int8"], "label": "spr"}


def result(**fields) -> dict:
    return {"trial_id": "0123456789ab/3", "attempt": 1, "ok": True, "metric": 0.99, **fields}


def ready(**fields) -> dict:
    return {"worker_id": "w1", "boot_id": "b", "host": "h", "cores": 2, "slots": 2, "version": 1, "running": [],
            "outbox": [], **fields}


def with_change(base: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(base)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


BAD_FIGURES = [
    (("size_bytes",), -1), (("size_bytes",), 1.5), (("size_bytes",), True), (("size_of",), "x" * 201),
    (("forms",), []), (("forms",), [FORM] * 5), (("forms",), "fast"), (("extra",), "smuggled"),
    (("input", "names"), ["x" * 65]), (("input", "shapes"), [[1] * 9]), (("input", "shapes"), [[-1]]),
    (("notes",), ["n"] * 9), (("notes",), [b"raw"]), (("input",), KeyError),
    (("forms", 0, "p50_ms"), 0), (("forms", 0, "p50_ms"), float("nan")), (("forms", 0, "p90_ms"), float("inf")),
    (("forms", 0, "spread"), -0.1), (("forms", 0, "repeats"), 0), (("forms", 0, "batch"), 0),
    (("forms", 0, "cores"), []), (("forms", 0, "cores"), [-1]), (("forms", 0, "cores"), list(range(5000))),
    (("forms", 0, "threads"), 0), (("forms", 0, "exclusive"), 1), (("forms", 0, "paused"), -1),
    (("forms", 0, "note"), "x" * 501), (("forms", 0, "runtime"), None), (("forms", 0, "compile_s"), -2.0),
    (("forms", 0, "peak_bytes"), 1 << 63), (("forms", 0, "hidden"), 1), (("forms", 0, "form"), KeyError),
]


@pytest.mark.parametrize("path, value", BAD_FIGURES)
def test_hostile_figures_are_refused_at_the_door(path, value):
    body = result(figures=with_change(FIGURES, path, value))
    with pytest.raises(ProtocolError, match="figures"):
        unpack(pack(Cmd.RESULT, body), WORKER_TO_BROKER)


def test_real_figures_pass_and_so_do_the_outbox_entries_carrying_them():
    assert unpack(pack(Cmd.RESULT, result(figures=FIGURES, pruned=False)), WORKER_TO_BROKER).body["figures"] == FIGURES
    unpack(pack(Cmd.READY, ready(outbox=[result(figures=FIGURES)])), WORKER_TO_BROKER)
    with pytest.raises(ProtocolError, match="outbox"):  # a bad figures map inside READY's outbox
        unpack(pack(Cmd.READY, ready(outbox=[result(figures={"forms": "x"})])), WORKER_TO_BROKER)
    with pytest.raises(ProtocolError, match="pruned"):
        unpack(pack(Cmd.RESULT, result(pruned="yes")), WORKER_TO_BROKER)


@pytest.mark.parametrize("path, value", [
    (("cpu",), "x" * 257), (("cores",), 0), (("cores",), 10**6), (("isa",), ["AVX512"]), (("isa",), ["a"] * 33),
    (("isa",), ["../x"]), (("label",), "a b"), (("label",), "x" * 65), (("label",), 5), (("gpu",), "h100"),
    (("cpu",), KeyError),
])
def test_hostile_hardware_is_refused_at_the_door(path, value):
    with pytest.raises(ProtocolError, match="hardware"):
        unpack(pack(Cmd.READY, ready(hardware=with_change(HARDWARE, path, value))), WORKER_TO_BROKER)
    assert unpack(pack(Cmd.READY, ready(hardware=HARDWARE)), WORKER_TO_BROKER).body["hardware"] == HARDWARE


def test_random_mutations_of_figures_never_pass_unless_they_are_figures():
    """Random values in random places: a mutation passes the door only if it is still a figures map."""
    from nsd.protocol import FIGURES as CHECK

    rng = random.Random(3)
    junk = [None, -1, 0, 1.5, float("nan"), "", "x" * 600, [], {}, [1, "a"], {"a": 1}, True, b"\x00", 1 << 63]
    for _ in range(2000):
        body = copy.deepcopy(FIGURES)
        target = body
        while True:  # walk down a random path, then replace what is there
            key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
            if not (isinstance(target[key], (dict, list)) and target[key] and rng.random() < 0.6):
                break
            target = target[key]
        target[key] = rng.choice(junk)
        try:
            passed = unpack(pack(Cmd.RESULT, result(figures=body)), WORKER_TO_BROKER).body["figures"]
        except ProtocolError:
            continue
        assert CHECK.ok(passed)
        for f in passed["forms"]:
            assert f["p50_ms"] > 0 and all(isinstance(c, int) and c >= 0 for c in f["cores"])


PRUNE = {"objective": "latency", "best": 25.0, "margin": 0.05, "baseline": FIGURES}


@pytest.mark.parametrize("prune", [
    "latency", [], {**PRUNE, "objective": "first"}, {**PRUNE, "objective": "speed"},
    {**PRUNE, "objective": {"latency": -1}}, {**PRUNE, "objective": {}}, {**PRUNE, "best": float("nan")},
    {**PRUNE, "margin": 2}, {**PRUNE, "baseline": {"forms": []}}, {k: v for k, v in PRUNE.items() if k != "best"},
    {**PRUNE, "extra": 1},
])
def test_the_worker_refuses_a_hostile_prune_rule(prune):
    assert "prune" in checks._prune(prune)


def test_the_worker_takes_a_real_prune_rule():
    assert checks._prune(None) is None and checks._prune(PRUNE) is None
    assert checks._prune({**PRUNE, "objective": {"latency": 0.7, "size": 0.3}, "baseline": None}) is None
