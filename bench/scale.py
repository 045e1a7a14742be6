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

All processes share this machine's cores: the simulators compete with the broker for CPU, which the
table's `sim CPU` column shows. `--profile DIR` runs the broker under py-spy (if installed) or cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/scale.py` from anywhere
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

from nsd.liveness import heartbeat_due  # noqa: E402
from nsd.net import configure, install_uvloop  # noqa: E402
from nsd.protocol import BROKER_TO_WORKER, PROTOCOL_VERSION, Cmd, ProtocolError, pack, unpack  # noqa: E402

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


# ---- process bookkeeping -----------------------------------------------------------------------

_STARTED: dict[int, str] = {}  # pid -> what: every process this harness started
_ALL_STARTED: list[int] = []


def _kill_everything() -> None:
    """Last resort (atexit, errors): SIGKILL whatever we started that is still alive."""
    for pid in list(_STARTED):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        _STARTED.pop(pid, None)


atexit.register(_kill_everything)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def die_with_parent() -> None:
    """Linux: get SIGKILL when the process that started us dies (a harness killed with -9)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# A tiny launcher: die with the parent, then become the real command (same PID: /proc/PID is the broker).
_EXEC_PRELUDE = ("import ctypes, os, signal, sys\n"
                 "try: ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)\n"
                 "except Exception: pass\n"
                 "os.execvp(sys.argv[1], sys.argv[1:])\n")


# ---- the simulator (runs in its own process: `scale.py _sim CONFIG_JSON`) --------------------------

class SimStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.trial_assigns = 0
        self.busy_s = 0.0  # trial time handed out (the sum of every trial's sleep)
        self.trial_results = 0
        self.plan_jobs = 0
        self.save_jobs = 0
        self.first_assign = math.inf
        self.last_assign = 0.0
        self.first_result = math.inf
        self.last_result = 0.0
        self.latencies: list[float] = []
        self.cancels = 0
        self.disconnects = 0
        self.hb_sent = 0
        self.hb_received = 0
        self.send_errors = 0
        self.bad = 0
        self.max_silence = 0.0  # longest gap between two messages from the broker to one worker
        self.cpu0 = _cpu_self()
        self.t0 = time.monotonic()

    def report(self) -> dict[str, Any]:
        return {"trial_assigns": self.trial_assigns, "busy_s": self.busy_s, "trial_results": self.trial_results,
                "plan_jobs": self.plan_jobs, "save_jobs": self.save_jobs,
                "first_assign": self.first_assign if self.trial_assigns else None,
                "last_assign": self.last_assign if self.trial_assigns else None,
                "first_result": self.first_result if self.trial_results else None,
                "last_result": self.last_result if self.trial_results else None,
                "latencies": [round(x, 6) for x in self.latencies],
                "cancels": self.cancels, "disconnects": self.disconnects, "hb_sent": self.hb_sent,
                "hb_received": self.hb_received, "send_errors": self.send_errors, "bad": self.bad,
                "cpu_s": _cpu_self() - self.cpu0, "wall_s": time.monotonic() - self.t0}


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class SimWorker:
    """One simulated worker daemon: one DEALER, identity = worker id, `slots` credits."""

    def __init__(self, sim: "Simulator", worker_id: str):
        self.sim, self.id = sim, worker_id
        self.sock = configure(sim.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.running: dict[tuple[str, int], Any] = {}  # lease -> timer handle (or None)
        # Credits in the order they came free (None: free from the start, not timed). The broker answers
        # them in order, so the k-th ASSIGN fills the k-th credit: exact FIFO matching, any slot count.
        self.freed: collections.deque[float | None] = collections.deque()
        self.registered = False
        self.liveness = 5  # the broker's, from READY_ACK
        self.last_heard = time.monotonic()

    def send(self, cmd: Cmd, body: dict) -> None:
        fut = self.sock.send_multipart(pack(cmd, body))
        if fut.done():
            if fut.exception() is not None:
                self.sim.stats.send_errors += 1
        else:
            fut.add_done_callback(self.sim.sent)

    def ready(self) -> None:
        self.send(Cmd.READY, {"worker_id": self.id, "boot_id": self.sim.boot_id, "host": "sim",
                              "cores": self.sim.slots, "slots": self.sim.slots, "version": PROTOCOL_VERSION,
                              "running": [list(k) for k in self.running], "outbox": []})

    async def serve(self) -> None:
        sim, stats = self.sim, self.sim.stats
        while True:
            frames = await self.sock.recv_multipart()
            now = time.monotonic()
            if self.registered and now - self.last_heard > stats.max_silence:
                stats.max_silence = now - self.last_heard
            self.last_heard = now
            try:
                msg = unpack(frames, BROKER_TO_WORKER)
            except ProtocolError:
                stats.bad += 1
                continue
            cmd, b = msg.cmd, msg.body
            if cmd is Cmd.ASSIGN:
                key = (b["trial_id"], b["attempt"])
                kind = b["job"].get("kind")
                if self.freed:  # a slot that freed earlier got its next job
                    freed = self.freed.popleft()
                    if freed is not None:
                        stats.latencies.append(now - freed)
                if kind == "trial":
                    stats.trial_assigns += 1
                    stats.first_assign = min(stats.first_assign, now)
                    stats.last_assign = now
                    if sim.trial_s > 0:
                        length = sim.trial_s * (1 + sim.jitter * (2 * random.random() - 1))
                        stats.busy_s += length
                        self.running[key] = sim.loop.call_later(length, self.finish_trial, key)
                    else:
                        self.running[key] = None
                        self.finish_trial(key)
                elif kind == "plan":
                    stats.plan_jobs += 1
                    self.result(key, {"ok": True, "baseline": 1.0, "seconds": 0.0, "configs": sim.plan})
                elif kind == "save":
                    stats.save_jobs += 1
                    data = f"artifact {b['trial_id']}".encode()
                    sha = hashlib.sha256(data).hexdigest()
                    self.send(Cmd.STORE, {"sha256": sha, "offset": 0, "size": len(data), "data": data})
                    self.result(key, {"ok": True, "artifact": sha, "seconds": 0.0})
                else:
                    self.result(key, {"ok": False, "error": f"unknown job kind {kind!r}"})
            elif cmd is Cmd.HEARTBEAT:
                stats.hb_received += 1
            elif cmd is Cmd.CANCEL:
                stats.cancels += 1
                key = (b["trial_id"], b["attempt"])
                if key in self.running:
                    handle = self.running.pop(key)
                    if handle is not None:
                        handle.cancel()
                    self.freed.append(now)
            elif cmd is Cmd.READY_ACK:
                self.liveness = b["liveness"]
                if not self.registered:
                    self.registered = True
                    self.freed.extend([None] * sim.slots)
                    sim.registered += 1
                    if sim.registered == len(sim.workers):
                        sim.all_registered.set()
            elif cmd is Cmd.DISCONNECT:  # the broker forgot us (or declared us dead): register again
                stats.disconnects += 1
                self.ready()
            # RESULT_ACK, STORE_ACK, CHUNK: nothing to do

    def finish_trial(self, key: tuple[str, int]) -> None:
        if key not in self.running:
            return  # cancelled meanwhile
        stats = self.sim.stats
        self.result(key, {"ok": True, "metric": 0.0, "seconds": self.sim.trial_s})
        now = time.monotonic()
        stats.trial_results += 1
        stats.first_result = min(stats.first_result, now)
        stats.last_result = now

    def result(self, key: tuple[str, int], body: dict) -> None:
        """Report a job (plan, trial or save): its slot is free from now on."""
        self.running.pop(key, None)
        self.send(Cmd.RESULT, {"trial_id": key[0], "attempt": key[1], **body})
        self.freed.append(time.monotonic())

    async def heartbeat(self, interval: float) -> None:
        """As a real worker: every interval while it runs something, every idle interval otherwise."""
        await asyncio.sleep(random.uniform(0, interval))  # spread them out, as real workers are
        last_sent = 0.0
        while True:
            now = time.monotonic()
            if self.registered and heartbeat_due(now, last_sent, interval, self.liveness, busy=bool(self.running)):
                self.send(Cmd.HEARTBEAT, {"running": [list(k) for k in self.running]})
                self.sim.stats.hb_sent += 1
                last_sent = now
            await asyncio.sleep(interval)


class Simulator:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.slots = cfg["slots"]
        self.trial_s = cfg["trial_s"]
        self.jitter = cfg.get("jitter", 0.0)
        self.boot_id = f"sim-{os.getpid()}"
        self.plan = [{"config": {"sim": {"i": i}}, "label": f"sim {i}"} for i in range(cfg["plan_trials"])]
        self.stats = SimStats()
        self.ctx = zmq.asyncio.Context()
        self.ctx.set(zmq.MAX_SOCKETS, len(cfg["worker_ids"]) + 64)
        self.loop = asyncio.get_running_loop()
        self.registered = 0
        self.all_registered = asyncio.Event()
        self.workers = [SimWorker(self, wid) for wid in cfg["worker_ids"]]

    def sent(self, fut) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.stats.send_errors += 1

    async def run(self) -> None:
        tasks = []
        for w in self.workers:
            w.sock.connect(self.cfg["endpoint"])
            w.ready()
            tasks.append(asyncio.create_task(w.serve()))
            tasks.append(asyncio.create_task(w.heartbeat(self.cfg["heartbeat_s"])))
        reader = asyncio.StreamReader()
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def announce() -> None:
            await self.all_registered.wait()
            _emit({"event": "registered", "workers": len(self.workers)})

        tasks.append(asyncio.create_task(announce()))
        try:
            while True:
                line = (await reader.readline()).decode().strip()
                if line == "progress":
                    st = self.stats
                    _emit({"event": "progress", "trial_results": st.trial_results, "save_jobs": st.save_jobs,
                           "plan_jobs": st.plan_jobs})
                elif line == "report":
                    now = time.monotonic()
                    silence = max([self.stats.max_silence] + [now - w.last_heard for w in self.workers])
                    _emit({"event": "report", **self.stats.report(), "max_broker_silence_s": round(silence, 3)})
                elif line == "reset":
                    self.stats.reset()
                    now = time.monotonic()
                    for w in self.workers:
                        w.last_heard = now
                    _emit({"event": "reset"})
                else:  # "quit", or EOF: the harness is gone
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in self.workers:
                w.sock.close(linger=0)
            self.ctx.term()


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def sim_main(cfg: dict) -> None:
    die_with_parent()
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the harness, which tells us to quit
    install_uvloop()

    async def main() -> None:
        await Simulator(cfg).run()

    asyncio.run(main())


# ---- the harness -----------------------------------------------------------------------------------

class Proc:
    """A child process with line-oriented stdin/stdout (simulators) or none (the broker)."""

    def __init__(self, what: str, proc: asyncio.subprocess.Process):
        self.what, self.proc, self.pid = what, proc, proc.pid
        _STARTED[self.pid] = what
        _ALL_STARTED.append(self.pid)

    async def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.what}: no {event!r} within {timeout:g}s")
            raw = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            if not raw:
                raise RuntimeError(f"{self.what} (pid {self.pid}) exited with {await self.proc.wait()}")
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(raw)
                if obj.get("event") == event:
                    return obj

    async def stop(self, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    self.proc.stdin.write(b"quit\n")
                    self.proc.stdin.close()
            else:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except (asyncio.TimeoutError, TimeoutError):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        elif self.proc.stdin is not None:
            self.proc.stdin.close()
        _STARTED.pop(self.pid, None)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One broker (with `pair`, the primary of a broker pair and its backup) and its simulators, in a scratch
    folder; `close` kills every one of them by PID. Simulated workers and the client talk to the primary."""

    def __init__(self, scratch: Path, heartbeat_s: float, profile: Path | None, label: str, pair: bool = False):
        self.scratch, self.heartbeat_s, self.profile, self.label = scratch, heartbeat_s, profile, label
        self.pair = pair
        self.backup: Proc | None = None
        self.broker: Proc | None = None
        self.sims: list[Proc] = []
        self.endpoints: dict[str, str] = {}
        self.broker_pid = 0

    async def start_broker(self) -> None:
        state = self.scratch / "state"
        argv = [sys.executable, "-m", "nsd", "broker", "--state-dir", str(state),
                "--clients", "tcp://127.0.0.1:*", "--workers", "tcp://127.0.0.1:*",
                "--events", "tcp://127.0.0.1:*", "--heartbeat", str(self.heartbeat_s), "--log-level", "info"]
        if self.pair:  # the backup first: its own state dir and sockets, the pair's link on two fixed ports
            a, b = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
            argv += ["--role", "primary", "--peer", b, "--peer-bind", a]
            backup = [*argv[:5], str(self.scratch / "backup"), *argv[6:-6], "--role", "backup", "--peer", a,
                      "--peer-bind", b]
            with open(self.scratch / "backup.log", "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", _EXEC_PRELUDE, *backup, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=log, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
            self.backup = Proc("backup broker", proc)
        if self.profile is not None:
            self.profile.mkdir(parents=True, exist_ok=True)
            pyspy = shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy")
            if Path(pyspy).exists():
                argv = [str(pyspy), "record", "--idle", "-r", "200", "-f", "speedscope", "-o",
                        str(self.profile / f"broker-{self.label}.speedscope.json"), "--", *argv]
            else:
                argv = [sys.executable, "-m", "cProfile", "-o", str(self.profile / f"broker-{self.label}.prof"),
                        *argv[1:]]
        self.log_path = self.scratch / "broker.log"
        with open(self.log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _EXEC_PRELUDE, *argv, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.broker = Proc("broker", proc)
        deadline = time.monotonic() + 30
        pattern = re.compile(r"serving clients (\S+), workers (\S+), events (\S+)")
        while True:
            m = pattern.search(self.log_path.read_text(errors="replace"))
            if m:
                self.endpoints = dict(zip(("clients", "workers", "events"), m.groups()))
                break
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.05)
        # The broker itself: under py-spy it is py-spy's child.
        self.broker_pid = proc.pid
        if self.profile is not None and "py-spy" in argv[0]:
            for _ in range(100):
                kids = _children(proc.pid)
                if kids:
                    self.broker_pid = kids[0]
                    _STARTED[self.broker_pid] = "broker (under py-spy)"
                    _ALL_STARTED.append(self.broker_pid)
                    break
                await asyncio.sleep(0.05)

    async def start_sims(self, sc: Scenario, per_sim: int, plan_trials: int) -> None:
        ids = [f"sim{i:05d}" for i in range(sc.workers)]
        n_sims = max(1, math.ceil(sc.workers / per_sim))
        chunks = [ids[i::n_sims] for i in range(n_sims)]
        for k, chunk in enumerate(chunks):
            cfg = {"endpoint": self.endpoints["workers"], "worker_ids": chunk, "slots": sc.slots,
                   "trial_s": sc.trial_s, "jitter": sc.jitter, "plan_trials": plan_trials, "heartbeat_s": self.heartbeat_s}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "_sim", json.dumps(cfg), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=None, cwd=str(ROOT),
                env={**os.environ, "PYTHONPATH": str(ROOT)}, limit=1 << 26)
            self.sims.append(Proc(f"simulator {k}", proc))
        await asyncio.gather(*(s.expect("registered", 60 + sc.workers / 20) for s in self.sims))

    async def sims_command(self, command: str, answer: str) -> list[dict]:
        for s in self.sims:
            await s.send(command)
        return list(await asyncio.gather(*(s.expect(answer, 60) for s in self.sims)))

    async def settled(self, client) -> None:
        """A pair: the primary active and the backup's copy whole (what every figure is then taken with)."""
        from nsd.client.errors import BrokerError

        deadline, pair = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                pair = (await client.cluster_status())["pair"]
            except BrokerError:  # "not active" while the two are still finding each other
                pair = None
            if pair is not None and pair["state"] == "active" and (pair["peer"] or {}).get("whole"):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the broker pair did not settle: {pair}")

    async def close(self) -> None:
        if self.backup is not None:
            with contextlib.suppress(Exception):
                await self.backup.stop(signal.SIGTERM, grace_s=5)
        for s in self.sims:
            with contextlib.suppress(Exception):
                await s.stop()
        if self.broker is not None:
            if self.broker_pid != self.broker.pid:  # under py-spy: stop the broker, py-spy then writes and exits
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.broker_pid, signal.SIGTERM)
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await asyncio.wait_for(self.broker.proc.wait(), 60)
            with contextlib.suppress(Exception):
                await self.broker.stop(signal.SIGTERM, grace_s=60 if self.profile else 5)
            if alive(self.broker_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.broker_pid, signal.SIGKILL)
                await asyncio.sleep(0.2)
            _STARTED.pop(self.broker_pid, None)
        gone = [p.pid for p in (self.broker, self.backup, *self.sims) if p is not None] + [self.broker_pid]
        survivors = [pid for pid in gone if alive(pid)]
        if survivors:
            raise RuntimeError(f"processes survived: {survivors}")


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and memory of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat)
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                mem[line.split(":")[0]] = int(line.split()[1]) * 1024
    return {"cpu_s": cpu_s, "rss": mem.get("VmRSS", 0), "peak_rss": mem.get("VmHWM", 0), "t": time.monotonic()}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


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
            result["name"] = sc.name
        result["broker_pid"] = cluster.broker_pid
        base = _proc_usage(cluster.broker_pid)
        result["broker_rss_start_mb"] = round(base["rss"] / 2**20, 1)
        t_reg = time.monotonic()
        await cluster.start_sims(sc, args.per_sim, sc.trials)
        result["register_s"] = round(time.monotonic() - t_reg, 2)
        result["sim_pids"] = [s.pid for s in cluster.sims]
        result["simulators"] = len(cluster.sims)
        client = client or AsyncClient(cluster.endpoints["clients"], timeout_s=120)
        workers = await client.cluster()
        result["workers_registered"] = len(workers)
        backup0 = _proc_usage(cluster.backup.pid) if pair else None
        if sc.trials:
            await _run_task(sc, cluster, client, result, args.max_s)
        else:
            await _run_idle(sc, cluster, client, result)
        if backup0 is not None:  # what the copy costs the other head
            backup1 = _proc_usage(cluster.backup.pid)
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
            "tuning": {"config_set": [{"rtn": {"bits": [4, 8]}}], "tolerable_loss": 0.01,
                       "max_trials": sc.trials},
            "resources": {"workers": 0}}
    await cluster.sims_command("reset", "reset")
    u0 = _proc_usage(cluster.broker_pid)
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
    u1 = _proc_usage(cluster.broker_pid)
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
        "latency_p50_ms": _ms(_percentile(lat, 0.50)), "latency_p99_ms": _ms(_percentile(lat, 0.99)),
        "latency_max_ms": _ms(lat[-1] if lat else None),
        "client_rtt_n": len(rtt), "client_rtt_p50_ms": _ms(_percentile(rtt, 0.5)),
        "client_rtt_max_ms": _ms(rtt[-1] if rtt else None),
        "max_broker_silence_s": max(r["max_broker_silence_s"] for r in reports),
        "broker_cpu_pct": round(100 * (u1["cpu_s"] - u0["cpu_s"]) / (u1["t"] - u0["t"]), 1),
        "broker_rss_mb": round(u1["rss"] / 2**20, 1), "broker_peak_rss_mb": round(u1["peak_rss"] / 2**20, 1),
        "sim_cpu_pct": round(100 * sum(r["cpu_s"] for r in reports) / max(r["wall_s"] for r in reports), 1),
    })


async def _run_idle(sc: Scenario, cluster: Cluster, client, result: dict) -> None:
    await asyncio.sleep(min(3.0, sc.idle_s / 3))  # let registration traffic settle
    await cluster.sims_command("reset", "reset")
    u0 = _proc_usage(cluster.broker_pid)
    await asyncio.sleep(sc.idle_s)
    u1 = _proc_usage(cluster.broker_pid)
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
    if argv[:1] == ["_sim"]:
        sim_main(json.loads(argv[1]))
        return 0
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
        _kill_everything()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _kill_everything()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                         "started_pids": _ALL_STARTED, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
