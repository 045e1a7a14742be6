"""Helpers the tests share. A scripted worker peer: a real DEALER speaking the real protocol, answering
jobs from a table; the specs and answers tests give it (`spec`, `metrics_answer`, `done`). The other peers:
a fake broker for a real worker (`FakeBroker`, with `trial_job`), and what systemd hears (`NotifyListener`).

It lets broker tests drive dispatch, cancellation, requeue and decisions over real sockets in
milliseconds, without INC; the end-to-end tests use real workers and real INC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Callable

import zmq
import zmq.asyncio

from nsd.client.api import AsyncClient
from nsd.net import configure
from nsd.protocol import BROKER_TO_WORKER, PROTOCOL_VERSION, WORKER_TO_BROKER, Cmd, ProtocolError, pack, unpack
from nsd.states import TaskState
from tests.conftest import wait_for


def plan_answer(baseline: float, n: int) -> dict:
    return {"ok": True, "baseline": baseline,
            "configs": [{"config": {"rtn": {"bits": i}}, "label": f"rtn(bits={i})"} for i in range(n)]}


def plan_then_hold(n: int, baseline: float = 1.0):
    """An `answer` that plans n trials, then holds every trial it gets (the test answers or cancels them)."""
    return lambda job: plan_answer(baseline, n) if job["kind"] == "plan" else None


class ScriptedWorker:
    live: set[ScriptedWorker] = set()  # not yet stopped: conftest closes these after a test that failed early

    def __init__(self, endpoint: str, worker_id: str, slots: int = 1,
                 answer: Callable[[dict], dict | None] | None = None, delay_s: float = 0.0,
                 version: int = PROTOCOL_VERSION, curve=None, hardware: dict | None = None,
                 versions: dict | None = None):
        self.endpoint, self.worker_id, self.slots = endpoint, worker_id, slots
        # READY's hardware (deployment figures' key, the --label) and versions (the metric cache's), if given
        self.hardware, self.versions = hardware, versions
        self.answer, self.delay_s, self.version = answer, delay_s, version
        self.assigned: list[tuple[str, int, dict]] = []
        self.cancelled: list[tuple[str, int]] = []
        self.rules: list[tuple[str, int, dict]] = []  # RULE messages: (trial_id, attempt, rule)
        self.disconnects: list[dict] = []
        self.acked: list[tuple[str, int]] = []
        self.running: set[tuple[str, int]] = set()
        self.store_acks: list[dict] = []
        self.drops: list[dict] = []  # DROP bodies: what the broker told it to erase
        self.chunks: list[dict] = []  # CHUNK replies to the FETCHes a test sent
        self.reported: dict[str, float] = {}  # trial job id -> the metric it reported (what it verifies against)
        self.heartbeats: list[float] = []  # when each of the broker's HEARTBEATs arrived (loop time)
        self.max_running = 0
        self.silent = False  # stop heartbeating and answering: look dead
        self.outbox: dict[tuple[str, int], dict] = {}  # results sent and not acknowledged (a real worker's outbox)
        self.epoch = 0  # the highest a broker of a pair told us (READY_ACK)
        self.curve = curve
        self.ctx = zmq.asyncio.Context()
        self.sock = self._socket()
        self._tasks: list[asyncio.Task] = []
        self.registered = asyncio.Event()
        ScriptedWorker.live.add(self)

    def _socket(self) -> zmq.asyncio.Socket:
        sock = configure(self.ctx.socket(zmq.DEALER))
        sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        if self.curve is not None:  # nsd.security.ClientKeys
            self.curve.apply(sock)
        return sock

    async def start(self, wait: bool = True, **ready) -> "ScriptedWorker":
        self.sock.connect(self.endpoint)
        self.send(Cmd.READY, {"worker_id": self.worker_id, "boot_id": "b1", "host": "scripted", "cores": self.slots,
                              "slots": self.slots, "version": self.version, "running": [list(k) for k in self.running],
                              "outbox": list(self.outbox.values()), **({"epoch": self.epoch} if self.epoch else {}),
                              **({"hardware": self.hardware} if self.hardware else {}),
                              **({"versions": self.versions} if self.versions else {}), **ready})
        self._tasks = [asyncio.create_task(self._serve()), asyncio.create_task(self._heartbeat())]
        if wait:
            await asyncio.wait_for(self.registered.wait(), 5)
        return self

    async def move(self, endpoint: str, failover: bool = True, wait: bool = True) -> "ScriptedWorker":
        """What a real worker does when its broker goes silent: a new connection to the other broker of a
        pair, registering with what it runs and its unacknowledged results."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)
        self.sock, self.endpoint = self._socket(), endpoint
        self.registered.clear()
        return await self.start(wait, failover=failover)
    def send(self, cmd: Cmd, body: dict) -> None:
        self.sock.send_multipart(pack(cmd, body))

    async def _serve(self) -> None:
        while True:
            msg = unpack(await self.sock.recv_multipart(), BROKER_TO_WORKER)
            if self.silent:
                continue
            b = msg.body
            if msg.cmd is Cmd.READY_ACK:
                self.epoch = max(self.epoch, b.get("epoch", 0))
                self.registered.set()
            elif msg.cmd is Cmd.ASSIGN:
                key = (b["trial_id"], b["attempt"])
                self.assigned.append((*key, b["job"]))
                self.running.add(key)
                self.max_running = max(self.max_running, len(self.running))
                if self.answer is not None:
                    asyncio.get_running_loop().call_later(self.delay_s, self._finish, key, b["job"])
            elif msg.cmd is Cmd.RULE:
                self.rules.append((b["trial_id"], b["attempt"], b["rule"]))
            elif msg.cmd is Cmd.CANCEL:
                self.cancelled.append((b["trial_id"], b["attempt"]))
                self.running.discard((b["trial_id"], b["attempt"]))
            elif msg.cmd is Cmd.RESULT_ACK:
                self.acked.append((b["trial_id"], b["attempt"]))
                self.outbox.pop((b["trial_id"], b["attempt"]), None)
            elif msg.cmd is Cmd.DISCONNECT:
                self.disconnects.append(b)
            elif msg.cmd is Cmd.STORE_ACK:
                self.store_acks.append(b)
            elif msg.cmd is Cmd.DROP:
                self.drops.append(b)
            elif msg.cmd is Cmd.CHUNK:
                self.chunks.append(b)
            elif msg.cmd is Cmd.HEARTBEAT:
                self.heartbeats.append(asyncio.get_running_loop().time())

    def _finish(self, key: tuple[str, int], job: dict) -> None:
        if key not in self.running or self.silent:
            return
        if job["kind"] == "save":  # upload a stand-in artifact the way a real worker does, then report it
            data = f"artifact of trial {job['index']}".encode()
            sha = hashlib.sha256(data).hexdigest()
            self.send(Cmd.STORE, {"sha256": sha, "offset": 0, "size": len(data), "data": data})
            self.result(key, {"ok": True, "artifact": sha})
            return
        if job["kind"] == "verify":  # an honest verifier: the winning trial's metric, as it reported or answers it
            trial_id = f"{job['task_id']}/{job['index']}"
            trial = {"metric": self.reported[trial_id]} if trial_id in self.reported else \
                self.answer({**job, "kind": "trial"})
            body = None if trial is None else {"ok": True, "metric": trial.get("metric")}
        else:
            body = self.answer(job)
        if body is None:
            return  # hold this one: the test finishes it
        self.result(key, body)

    def result(self, key: tuple[str, int], body: dict) -> None:
        self.running.discard(key)
        if body.get("metric") is not None:
            self.reported[key[0]] = body["metric"]
        self.outbox[key] = {"trial_id": key[0], "attempt": key[1], "seconds": 0.01, **body}
        self.send(Cmd.RESULT, self.outbox[key])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if not self.silent:
                self.send(Cmd.HEARTBEAT, {"running": [list(k) for k in self.running]})

    async def stop(self, bye: bool = False) -> None:
        """Stop; with `bye`, say goodbye first (the broker forgets it at once, not after its liveness)."""
        if bye:
            self.send(Cmd.BYE, {})
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.close()

    def close(self) -> None:
        """Sockets only, no awaiting: also what the teardown of a test that failed before `stop` calls."""
        for t in self._tasks:
            t.cancel()
        self.sock.close(linger=0)
        self.ctx.term()
        ScriptedWorker.live.discard(self)


# ---- specs and answers for the tests that use scripted workers, and small utilities ----------------------

# Its config set holds every config a scripted plan lists (plan_answer: bits 0 .. n-1, in order), since the
# broker refuses a plan that is not the expansion of the task's config set (nsd/broker/plan_check.py).
SPEC = {"name": "scripted", "recipe": {"kind": "python", "file": os.path.abspath(__file__)},
        "tuning": {"config_set": [{"rtn": {"bits": list(range(1000))}}], "tolerable_loss": 0.1}}


def spec(**tuning) -> dict:
    return {**SPEC, "tuning": {**SPEC["tuning"], **tuning}}


def metrics_answer(metrics: dict[int, float | str], baseline: float = 1.0, n: int = 6):
    """Answer a plan with n configs; trial i with metrics[i] (a string: that error)."""
    def answer(job: dict) -> dict:
        if job["kind"] == "plan":
            return plan_answer(baseline, n)
        value = metrics[job["index"]]
        return {"ok": False, "error": value} if isinstance(value, str) else {"ok": True, "metric": value}
    return answer


async def done(client: AsyncClient, task_id: str, timeout: float = 20) -> dict:
    async def ended():
        task = await client.status(task_id)
        return task if TaskState(task["state"]).terminal else None
    return await wait_for(ended, timeout)


async def count_assigned(w: ScriptedWorker, kind: str, n: int) -> bool:
    """Whether w has been assigned at least n jobs of this kind (plan, trial, save)."""
    return sum(a[2]["kind"] == kind for a in w.assigned) >= n


# ---- early stop (issue 11): shared by tests/test_early_stop.py and tests/test_builtin_recipes.py ----

def steps_then_metric(steps):
    """Every interval an evaluate_steps generator yields (nsd.quant.scoring), then its metric."""
    try:
        while True:
            yield next(steps)
    except StopIteration as finished:
        yield finished.value


async def tune_on_and_off(client: AsyncClient, spec: dict) -> tuple[dict, dict]:
    """The same task with early stopping on, then off (no cache: both really run)."""
    results = []
    for early_stop in (True, False):
        run = {**spec, "tuning": {**spec["tuning"], "early_stop": early_stop, "cache": False}}
        results.append(await client.result(await client.submit(run), wait=True))
    return results[0], results[1]


def assert_same_answer_on_off(on: dict, off: dict) -> None:
    """Winner, its metric, met_goal, baseline and every full metric equal; a stopped trial's full metric
    lies within its interval, and a refine job gave exactly it."""
    assert on["state"] == off["state"] == "done"
    assert on["winner"] == off["winner"] and on["met_goal"] == off["met_goal"] and on["baseline"] == off["baseline"]
    sign = 1 if on["spec"]["tuning"]["higher_is_better"] else -1
    assert not any(t["stopped_early"] for t in off["trials"])
    for a, b in zip(on["trials"], off["trials"]):
        if a["stopped_early"]:  # it could not meet the goal: its full metric is within its interval
            lo, hi = a["interval"]
            assert a["state"] == "failed_goal" and sign * b["metric"] <= sign * a["bound"]
            assert (lo is None or lo <= b["metric"]) and (hi is None or b["metric"] <= hi)
            assert a["metric"] in (None, b["metric"]) and (a["metric"] is not None) == (a["refine"] == "done")
        else:
            assert (a["state"], a["metric"]) == (b["state"], b["metric"])


def random_interval(metric: float, goal, rng, values) -> tuple[float | None, float | None]:
    """(low, high) a trial with this full metric, below the goal, may have stopped with: it holds the metric,
    its best end stays below the goal, and its ends often sit on other trials' metrics (ties); None: unbounded."""
    from nsd.broker.tuner import goal_threshold

    sign, need = (1 if goal.higher_is_better else -1), goal_threshold(goal)
    v = sign * metric
    assert v < need
    hi = rng.choice([v, (v + need) / 2, *(sign * x for x in values if v <= sign * x < need)])
    lo = rng.choice([v, None, *(sign * x for x in values if sign * x <= v)])
    if sign > 0:
        return lo, hi
    return -hi, (None if lo is None else -lo)


class FakeBroker:
    """A ROUTER that records what the worker sends and sends whatever the test says."""

    def __init__(self):
        self.ctx = zmq.asyncio.Context()
        self.sock = configure(self.ctx.socket(zmq.ROUTER))
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identity: bytes | None = None
        self.received: list[tuple[Cmd, dict]] = []
        self.times: list[float] = []  # when each of `received` arrived (loop time)
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart()
            try:
                msg = unpack(frames, WORKER_TO_BROKER)
            except ProtocolError:
                continue
            self.identity = identity
            self.received.append((msg.cmd, msg.body))
            self.times.append(asyncio.get_running_loop().time())

    def of(self, cmd: Cmd) -> list[dict]:
        return [body for c, body in self.received if c is cmd]

    def send(self, cmd: Cmd, body: dict) -> None:
        self.raw(pack(cmd, body))

    def raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.identity, *frames])

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close(linger=0)
        self.ctx.term()


def job_spec(**model) -> dict:
    from nsd.spec import validate

    return validate({"name": "h", "model": {"shared": True, **model},
                     "recipe": {"kind": "python", "file": "/nonexistent/recipe.py"},
                     "tuning": {"config_set": [{"rtn": {"bits": 4}}]}}).to_dict()


def trial_job(task_id: str = "abc123abc123", index: int = 0, **changes) -> dict:
    return {"kind": "trial", "task_id": task_id, "spec": job_spec(), "index": index,
            "config": {"rtn": {"bits": 4}}, "cores": 1, **changes}


class NotifyListener:
    """What systemd would receive on $NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def read_until(self, key: str, timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append(fields)
            if key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


# ---- deployment figures (issue 17): shared by tests/test_broker_figures.py and tests/test_gateway_figures.py ----

HW = {"cpu": "Scripted CPU", "cores": 2, "isa": ["avx512_vnni"], "label": None}
VERSIONS = {"nsd": "scripted", "nsd-code": "x", "torch": "2.13.0"}


def figures(p50: float, size: int = 1000, form: str = "int8-compiled") -> dict:
    return {"size_bytes": size, "size_of": "scripted", "input": {"names": ["x"], "shapes": [[8, 4]]}, "notes": [],
            "forms": [{"form": form, "runtime": "scripted", "p50_ms": p50, "p90_ms": p50 * 1.1, "spread": 0.01,
                       "repeats": 20, "throughput": 8000 / p50, "batch": 8, "load_s": 0.1, "compile_s": 1.0,
                       "peak_bytes": 5000, "run_bytes": 4000, "cores": [0], "threads": 1, "exclusive": True,
                       "paused": 0, "note": None}]}


FP32_FIGURES = figures(100.0, 4000, "fp32-compiled")


def figures_answers(table: dict[int, tuple], pruned: dict[int, float] | None = None, n: int = 4):
    """Plan n trials (FP32 measured); trial i: (metric, p50 ms) — figures for passing ones, as a runner does; a
    job with a prune rule is measured first and answered `pruned` where `pruned` says so."""
    def answer(job: dict) -> dict:
        if job["kind"] == "plan":
            return {**plan_answer(1.0, n), "figures": FP32_FIGURES}
        metric, p50 = table[job["index"]]
        if job.get("prune") and pruned and job["index"] in pruned:
            return {"ok": True, "metric": None, "pruned": True, "figures": figures(pruned[job["index"]])}
        body = {"ok": True, "metric": metric}
        if metric >= 0.9:  # passes (goal: 1.0 x (1 - 0.1))
            body["figures"] = figures(p50)
        return body
    return answer
