"""A hostile broker against a real worker daemon: a fake ROUTER socket sends frames whose fields hold
values no broker should send (ids that name paths, negative offsets, chunks that do not fit, bad timing,
jobs that are not jobs). The worker logs and ignores each, never crashes, and keeps serving: it still
heartbeats, and it still runs a valid job afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import msgpack
import pytest

from nsd.blobs import make_ref
from nsd.protocol import MAGIC, Cmd
from tests.conftest import wait_for
from tests.peers import job_spec, trial_job

pytestmark = pytest.mark.slow  # a real worker daemon: its runner processes start

SHA = "d" * 64


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


HOSTILE_LEASES = [
    ("../../../../tmp/nsd-pwned/0", 1),  # would name a log folder outside the cache
    ("/etc/0", 1),
    ("abc123abc123/-6", 1),
    ("abc123abc123/ +1 ", 1),
    ("abc123abc123/0", 0),
    ("abc123abc123/0", -3),
    ("abc123abc123/0", 2**62),
    ("x" * 100_000 + "/0", 1),
    ("abc123abc123/refine/../../0", 1),  # a per-trial kind's id: only `<kind>/<index>`
    ("abc123abc123/trial/3", 1),
    ("abc123abc123/baseline/3", 1),
]


async def test_hostile_values_are_ignored_and_the_worker_keeps_serving(fake_and_worker, tmp_path):
    fake, daemon, run = fake_and_worker
    outside_before = tree(tmp_path)
    for trial_id, attempt in HOSTILE_LEASES:
        fake.send(Cmd.ASSIGN, {"trial_id": trial_id, "attempt": attempt, "job": trial_job()})
        fake.send(Cmd.CANCEL, {"trial_id": trial_id, "attempt": attempt})
        fake.send(Cmd.RESULT_ACK, {"trial_id": trial_id, "attempt": attempt})
        fake.send(Cmd.RULE, {"trial_id": trial_id, "attempt": attempt, "rule": {"sign": 1, "need": 0.5}})
    # Rules no broker would send (or for a job it does not run): ignored.
    for rule in ({"sign": 0, "need": 0.5}, {"sign": 1, "need": "0.5"}, {"sign": 1}, {"sign": -1, "need": 1e400}):
        fake.send(Cmd.RULE, {"trial_id": "abc123abc123/0", "attempt": 1, "rule": rule})
    fake.send(Cmd.RULE, {"trial_id": "abc123abc123/77", "attempt": 1, "rule": {"sign": 1, "need": 0.5}})
    # Timing no broker would negotiate: kept as it was.
    for hb, liveness in [(-1, 5), (float("nan"), 5), (1e-9, 5), (1e9, 5), (61.0, 5), (1.0, 0), (1.0, 101), (1.0, "5"),
                         (1.0, True), (1.0, 2.5)]:
        fake.send(Cmd.READY_ACK, {"heartbeat_s": hb, "liveness": liveness})
    fake.send(Cmd.DISCONNECT, {"reason": "x" * 10_000, "fatal": "yes"})  # not a bool: not fatal
    # Chunks and store acks nobody asked for, with values out of range.
    for body in [{"sha256": "../../x", "offset": 0}, {"sha256": SHA, "offset": -1, "data": b"", "size": 0},
                 {"sha256": SHA, "offset": 0, "data": "text", "size": 4}, {"sha256": SHA, "offset": 0, "error": 7},
                 {"sha256": SHA, "offset": 2**63, "data": b"x", "size": 2**64 - 1}]:
        fake.send(Cmd.CHUNK, body)
    fake.send(Cmd.STORE_ACK, {"sha256": SHA, "offset": -5, "complete": "yes"})
    # Erasures (DROP) whose names would leave the cache: refused at the door, nothing outside is touched.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("precious")
    for body in [{"sha256": ["../../victim"], "tasks": []}, {"sha256": [], "tasks": ["../../victim"]},
                 {"sha256": [], "tasks": ["../" * 6]}, {"sha256": [str(victim)], "tasks": [str(victim)]}]:
        fake.send(Cmd.DROP, body)
    outside_before = tree(tmp_path)
    # Frames that do not decode, or decode to the wrong types.
    fake.raw([MAGIC, bytes([Cmd.ASSIGN]), msgpack.packb({"trial_id": 1, "attempt": "1", "job": []})])
    fake.raw([MAGIC, bytes([Cmd.ASSIGN]), b"\xc1"])
    fake.raw([b"junk"])
    # A lease that is well formed, with a job that is not: refused with a RESULT, not left hanging.
    bad_jobs = {
        "abc123abc123/1": trial_job(index=1, cores=10**9),
        "abc123abc123/2": trial_job(index=3),  # does not match its id
        "abc123abc123/3": trial_job(index=3, kind="plan"),
        "abc123abc123/4": trial_job(index=4, task_id="other"),
        "abc123abc123/5": trial_job(index=5, spec={"model": []}),
        "abc123abc123/6": trial_job(index=6, spec={**job_spec(), "tuning": {"max_attempts": "many"}}),
        "abc123abc123/7": {"kind": "trial"},
        "abc123abc123/8": trial_job(index=8, config={"rtn": {}, "gptq": {}}),
        "abc123abc123/9": trial_job(index=9, spec={**job_spec(), "recipe": {"kind": "python", "file": "/r.py"},
                                            "model": {"shared": False, "path": "/etc/shadow"}}),
        # job kinds of lazy exactness and the baseline split: a refine's id names its trial; a baseline's
        # families map each config name to one config of it; a stop rule has its shape
        "abc123abc123/refine/10": trial_job(index=11, kind="refine"),
        "abc123abc123/refine/12": {**trial_job(index=12, kind="refine"), "config": "rtn"},
        "abc123abc123/baseline": {"kind": "baseline", "task_id": "abc123abc123", "spec": job_spec(),
                                  "families": {"rtn": {"gptq": {}}}},
        "abc123abc123/13": trial_job(index=13, rule={"sign": 2, "need": 0.5}),
        "abc123abc123/14": trial_job(index=14, rule={"sign": 1, "need": float("nan")}),
    }
    for trial_id, job in bad_jobs.items():
        fake.send(Cmd.ASSIGN, {"trial_id": trial_id, "attempt": 1, "job": job})

    async def all_refused():
        return {r["trial_id"] for r in fake.of(Cmd.RESULT)} >= set(bad_jobs)

    await wait_for(all_refused, 30)
    refused = {r["trial_id"]: r for r in fake.of(Cmd.RESULT)}
    assert all(refused[t]["ok"] is False and "the worker refused the job" in refused[t]["error"] for t in bad_jobs)
    assert "blob reference" in refused["abc123abc123/9"]["error"]
    assert not any(r["trial_id"].startswith(("..", "/")) or "-6" in r["trial_id"] for r in fake.of(Cmd.RESULT))
    assert not run.done() and daemon.fatal is None  # alive, not told to stop
    assert (daemon.heartbeat_s, daemon.liveness) == (1.0, 100)  # the first, sane timing was kept
    assert not any(s.job for s in daemon.slots) and not daemon.backlog  # nothing hostile runs
    assert tree(tmp_path) - outside_before <= {p for p in tree(tmp_path) if p.startswith("worker")}
    assert not Path("/tmp/nsd-pwned").exists()
    assert (victim / "keep").read_text() == "precious"
    # A well-formed DROP erases what it names inside the cache: a task's logs and kept models.
    for folder in ("logs", "kept"):
        (daemon.cache_dir / folder / "abc123abc999").mkdir(parents=True, exist_ok=True)
    fake.send(Cmd.DROP, {"sha256": [SHA], "tasks": ["abc123abc999"]})
    await wait_for(lambda: not (daemon.cache_dir / "logs" / "abc123abc999").exists(), 10)
    assert not (daemon.cache_dir / "kept" / "abc123abc999").exists() and "abc123abc999" in daemon.erased

    # Still serving: it heartbeats, and a valid job runs on its runner (and fails there, for a real reason).
    beats = len(fake.of(Cmd.HEARTBEAT))
    await wait_for(lambda: len(fake.of(Cmd.HEARTBEAT)) > beats + 2, 10)
    fake.send(Cmd.ASSIGN, {"trial_id": "abc123abc123/0", "attempt": 1, "job": trial_job()})

    async def ran():
        return [r for r in fake.of(Cmd.RESULT) if r["trial_id"] == "abc123abc123/0"]

    (result,) = await wait_for(ran, 120)
    assert result["ok"] is False and "refused" not in result["error"]
    assert "nonexistent/recipe.py" in result["error"]  # the runner tried to load the recipe
    assert daemon.ignored >= len(HOSTILE_LEASES) * 4 + 4


async def test_a_chunk_that_does_not_fit_its_blob_fails_the_fetch_at_once(fake_and_worker):
    """A blob reference the worker must fetch: the fake broker answers with a blob far over the cache
    size, then with a chunk longer than asked for. Each fetch ends with the reason (the job goes back to
    the broker, attempt + 1), nothing big is written, and the worker goes on."""
    fake, daemon, run = fake_and_worker
    ref = make_ref(hashlib.sha256(b"x").hexdigest(), "recipe.py")
    spec = {**job_spec(), "model": {"shared": False, "path": None},
            "recipe": {**job_spec()["recipe"], "file": ref}}
    answers = iter([lambda b: {"size": 2**50, "data": b"\0" * 1024 * 1024},
                    lambda b: {"size": 10, "data": b"\0" * 11}])

    async def answer_fetches():
        seen = 0
        while True:
            fetches = fake.of(Cmd.FETCH)
            for body in fetches[seen:]:
                fake.send(Cmd.CHUNK, {"sha256": body["sha256"], "offset": body["offset"], **next(answers)(body)})
            seen = len(fetches)
            await asyncio.sleep(0.02)

    server = asyncio.create_task(answer_fetches())
    try:
        for index in (0, 1):
            fake.send(Cmd.ASSIGN, {"trial_id": f"abc123abc123/{index}", "attempt": 1,
                                   "job": trial_job(index=index, spec=spec)})

            async def answered(index=index):
                return [r for r in fake.of(Cmd.RESULT) if r["trial_id"] == f"abc123abc123/{index}"]

            (result,) = await wait_for(answered, 20)
            assert result["requeue"] is True and "could not fetch" in result["error"]
            assert "bad CHUNK" in result["error"]
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    assert sum(f.stat().st_size for f in daemon.blobs.root.rglob("*") if f.is_file()) == 0  # nothing kept
    assert not run.done()


HOSTILE_VALUES = [None, -1, 0, 2**63, 2**64 - 1, "", "../../x", "abc123abc123/plan", "x" * 5000, b"\0" * 10, [], [1, [2]],
                  {}, {"a": {"b": None}}, 1e308, float("nan"), float("-inf"), False, 3.5]


async def test_random_hostile_field_values_never_reach_past_the_checks(fake_and_worker, caplog):
    """Valid-looking frames with one field (or one job/spec field) replaced by a hostile value, two
    thousand times: every one is handled by a check (no 'could not act on' from the last-resort guard),
    and the worker is still registered and heartbeating afterwards."""
    import random

    fake, daemon, run = fake_and_worker
    rng = random.Random(8)
    base = {
        Cmd.READY_ACK: {"heartbeat_s": 1.0, "liveness": 100},
        Cmd.ASSIGN: {"trial_id": "abc123abc123/plan", "attempt": 1, "job": {**trial_job(), "kind": "plan"}},
        Cmd.RESULT_ACK: {"trial_id": "abc123abc123/0", "attempt": 1},
        Cmd.CANCEL: {"trial_id": "abc123abc123/9", "attempt": 1},
        Cmd.CHUNK: {"sha256": SHA, "offset": 0, "size": 4, "data": b"abcd"},
        Cmd.STORE_ACK: {"sha256": SHA, "offset": 4, "complete": True},
        Cmd.DISCONNECT: {"reason": "re-register", "fatal": False},
        Cmd.HEARTBEAT: {},
    }
    for _ in range(2000):
        cmd = rng.choice(list(base))
        body = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base[cmd].items()}
        target = body
        if cmd is Cmd.ASSIGN and rng.random() < 0.5:  # inside the job, or inside its spec
            target = body["job"] = dict(body["job"])
            if rng.random() < 0.5:
                target = body["job"]["spec"] = {k: dict(v) if isinstance(v, dict) else v
                                                for k, v in body["job"]["spec"].items()}
                if rng.random() < 0.5:
                    target = target[rng.choice(["model", "recipe", "tuning", "resources"])]
        keys = [k for k in target if not (cmd is Cmd.DISCONNECT and k == "fatal")] or ["extra"]
        target[rng.choice(keys)] = rng.choice(HOSTILE_VALUES)
        fake.send(cmd, body)
        if rng.random() < 0.05:
            await asyncio.sleep(0)
    fake.send(Cmd.READY_ACK, base[Cmd.READY_ACK])  # answers the READY a valid DISCONNECT asked for
    beats = len(fake.of(Cmd.HEARTBEAT))
    await wait_for(lambda: len(fake.of(Cmd.HEARTBEAT)) > beats + 2, 30)
    assert not run.done() and daemon.fatal is None and daemon.registered.is_set()
    assert daemon.ignored > 100
    assert not [r for r in caplog.records if "could not act on" in r.getMessage()]
