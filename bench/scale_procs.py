"""The scale benchmark's processes (bench/scale.py): the broker and the simulators it starts, each killed by
PID at the end (atexit too, and with the harness even on `kill -9`), and what it reads of them in /proc."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


STARTED: dict[int, str] = {}  # pid -> what: every process this harness started
ALL_STARTED: list[int] = []


def kill_everything() -> None:
    """Last resort (atexit, errors): SIGKILL whatever we started that is still alive."""
    for pid in list(STARTED):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        STARTED.pop(pid, None)


atexit.register(kill_everything)


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
EXEC_PRELUDE = ("import ctypes, os, signal, sys\n"
                 "try: ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)\n"
                 "except Exception: pass\n"
                 "os.execvp(sys.argv[1], sys.argv[1:])\n")


class Proc:
    """A child process with line-oriented stdin/stdout (simulators) or none (the broker)."""

    def __init__(self, what: str, proc: asyncio.subprocess.Process):
        self.what, self.proc, self.pid = what, proc, proc.pid
        STARTED[self.pid] = what
        ALL_STARTED.append(self.pid)

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
        STARTED.pop(self.pid, None)


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
                    sys.executable, "-c", EXEC_PRELUDE, *backup, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
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
                sys.executable, "-c", EXEC_PRELUDE, *argv, stdin=subprocess.DEVNULL,
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
                kids = children(proc.pid)
                if kids:
                    self.broker_pid = kids[0]
                    STARTED[self.broker_pid] = "broker (under py-spy)"
                    ALL_STARTED.append(self.broker_pid)
                    break
                await asyncio.sleep(0.05)

    async def start_sims(self, sc, per_sim: int, plan_trials: int) -> None:
        ids = [f"sim{i:05d}" for i in range(sc.workers)]
        n_sims = max(1, math.ceil(sc.workers / per_sim))
        chunks = [ids[i::n_sims] for i in range(n_sims)]
        for k, chunk in enumerate(chunks):
            cfg = {"endpoint": self.endpoints["workers"], "worker_ids": chunk, "slots": sc.slots,
                   "trial_s": sc.trial_s, "jitter": sc.jitter, "plan_trials": plan_trials, "heartbeat_s": self.heartbeat_s}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "scale_sim.py"), json.dumps(cfg), stdin=subprocess.PIPE,
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
            STARTED.pop(self.broker_pid, None)
        gone = [p.pid for p in (self.broker, self.backup, *self.sims) if p is not None] + [self.broker_pid]
        survivors = [pid for pid in gone if alive(pid)]
        if survivors:
            raise RuntimeError(f"processes survived: {survivors}")


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


TICKS = os.sysconf("SC_CLK_TCK")


def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and memory of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                mem[line.split(":")[0]] = int(line.split()[1]) * 1024
    return {"cpu_s": cpu_s, "rss": mem.get("VmRSS", 0), "peak_rss": mem.get("VmHWM", 0), "t": time.monotonic()}


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


