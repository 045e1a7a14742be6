#!/usr/bin/env python
"""The scale benchmark's simulated workers (bench/scale.py starts this as `scale_sim.py CONFIG_JSON`): DEALER
sockets speaking the real protocol (nsd.protocol), several hundred per process, one per worker id; they
register, heartbeat as a real worker does (nsd.liveness), answer every ASSIGN after `trial_s` (a timer),
upload a tiny artifact for the save job, and report what they saw as JSON lines on stdout."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

from nsd.liveness import heartbeat_due  # noqa: E402
from nsd.net import configure, install_uvloop  # noqa: E402
from nsd.protocol import BROKER_TO_WORKER, PROTOCOL_VERSION, Cmd, ProtocolError, pack, unpack  # noqa: E402
from scale_procs import die_with_parent, raise_nofile  # noqa: E402

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
                elif kind == "verify":  # the saved model loaded again: every simulated trial scores 0.0
                    self.result(key, {"ok": True, "metric": 0.0, "seconds": 0.0})
                elif kind == "baseline":
                    self.result(key, {"ok": True, "baseline": 1.0, "seconds": 0.0})
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
        # The expansion of scale.py's config set (the broker checks a plan against it: nsd.broker.plan_check).
        self.plan = [{"config": {"rtn": {"sim_i": i}}, "label": f"sim {i}"} for i in range(cfg["plan_trials"])]
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



if __name__ == "__main__":
    sim_main(json.loads(sys.argv[1]))
