"""The worker daemon: registers with the broker, takes jobs by credit, runs them in runner processes.

It never imports torch: runners (`nsd.worker.runner`) do the INC work in their own processes, one per
slot, pinned to the slot's cores. Heartbeats come from here, not from the busy runner, so a long trial
never makes the worker look dead. Results stay in an on-disk outbox until the broker acknowledges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from nsd import __version__
from nsd.net import configure
from nsd.protocol import BROKER_TO_WORKER, PROTOCOL_VERSION, Cmd, ProtocolError, pack, unpack
from nsd.worker import pipe

log = logging.getLogger("nsd.worker")


class RunnerDied(RuntimeError):
    """The runner process ended while it held a job."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "runner stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"runner killed by {name}{hint}"
    return f"runner exited with code {returncode}"


class Runner:
    """One slot's persistent runner process."""

    def __init__(self, slot: int, cpus: list[int], workdir: Path, log_path: Path):
        self.slot, self.cpus, self.workdir, self.log_path = slot, cpus, workdir, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            # A fresh interpreter (never a fork of a process that holds a zmq Context).
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nsd.worker.runner", "--cpus", ",".join(map(str, self.cpus)),
                "--workdir", str(self.workdir), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_file, start_new_session=True)
        self._ready = asyncio.ensure_future(pipe.read_async(self.proc.stdout))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def run(self, job: dict) -> dict:
        if not self.alive:
            await self.start()
        if await self._ready is None:
            raise RunnerDied(await self._death())
        self.proc.stdin.write(pipe.encode(job))
        await self.proc.stdin.drain()
        answer = await pipe.read_async(self.proc.stdout)
        if answer is None:
            raise RunnerDied(await self._death())
        return answer

    async def _death(self) -> str:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        return describe_exit(self.proc.returncode)

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 8192))
                return f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    async def stop(self, kill: bool = False) -> None:
        if not self.alive:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its whole session: INC may start children
        else:
            self.proc.stdin.close()  # end of jobs: the runner exits by itself
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@dataclass
class Slot:
    runner: Runner
    job: tuple[str, int] | None = None  # (trial_id, attempt) it runs
    task: asyncio.Task | None = None


@dataclass
class WorkerConfig:
    broker: str = "tcp://127.0.0.1:5551"
    cpus: list[int] = field(default_factory=lambda: sorted(os.sched_getaffinity(0)))
    cores_per_trial: int = 1
    cache_dir: Path = Path.home() / ".cache" / "nsd" / "worker"
    worker_id: str | None = None
    heartbeat_s: float = 1.0
    liveness: int = 5
    backoff_max_s: float = 32.0


class WorkerDaemon:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.cache_dir = Path(config.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.worker_id = config.worker_id or self._persistent_id()
        self.boot_id = uuid.uuid4().hex
        k = max(1, config.cores_per_trial)
        n_slots = max(1, len(config.cpus) // k)
        self.slots = [Slot(Runner(i, _slot_cpus(config.cpus, i, k), self.cache_dir / "scratch" / f"slot{i}",
                                  self.cache_dir / "logs" / f"{self.worker_id}-slot{i}.log"))
                      for i in range(n_slots)]
        self.outbox_path = self.cache_dir / f"outbox-{self.worker_id}.json"
        self.outbox: dict[str, dict] = self._load_outbox()  # "trial_id#attempt" -> RESULT body
        self.backlog: list[tuple[str, int, dict]] = []  # jobs assigned while every slot was busy
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self._stopping = asyncio.Event()
        self.registered = asyncio.Event()
        self.fatal: str | None = None

    def _persistent_id(self) -> str:
        """Stable across restarts, so that the broker's ROUTER_HANDOVER hands the old identity over."""
        path = self.cache_dir / "worker-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            wid = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            path.write_text(wid)
            return wid

    # ---- outbox ----------------------------------------------------------------------------------

    def _load_outbox(self) -> dict[str, dict]:
        try:
            data = json.loads(self.outbox_path.read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def _save_outbox(self) -> None:
        tmp = self.outbox_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.outbox))
        os.replace(tmp, self.outbox_path)

    # ---- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stop(); reconnect with backoff whenever the broker goes quiet."""
        await asyncio.gather(*(s.runner.start() for s in self.slots))  # warm: imports paid before work arrives
        backoff = self.config.heartbeat_s
        try:
            while not self._stopping.is_set() and self.fatal is None:
                healthy = await self._session()
                if self._stopping.is_set() or self.fatal:
                    break
                backoff = self.config.heartbeat_s if healthy else min(backoff * 2, self.config.backoff_max_s)
                log.warning("lost the broker at %s; reconnecting in %.0fs", self.config.broker, backoff)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
        finally:
            await self._shutdown()
        if self.fatal:
            raise SystemExit(f"nsd worker: {self.fatal}")

    def stop(self) -> None:
        self._stopping.set()

    async def _session(self) -> bool:
        """One connection to the broker. Returns whether it got as far as being registered."""
        self.registered.clear()
        self.sock = configure(self.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        self.sock.connect(self.config.broker)
        hb = self.config.heartbeat_s
        deadline = hb * self.config.liveness
        last_heard = time.monotonic()
        last_sent = 0.0
        was_registered = False
        self._send(Cmd.READY, self._ready_body())
        try:
            while not self._stopping.is_set() and self.fatal is None:
                if await self.sock.poll(timeout=int(hb * 500)):
                    frames = await self.sock.recv_multipart()
                    last_heard = time.monotonic()
                    try:
                        msg = unpack(frames, BROKER_TO_WORKER)
                    except ProtocolError as exc:
                        log.warning("dropped a bad message from the broker: %s", exc)
                        continue
                    await self._handle(msg)
                    was_registered = was_registered or self.registered.is_set()
                now = time.monotonic()
                if now - last_heard > deadline:
                    return was_registered
                if self.registered.is_set() and now - last_sent >= hb:
                    self._send(Cmd.HEARTBEAT, {"running": self._running()})
                    last_sent = now
            if self._stopping.is_set() and self.registered.is_set():
                self._send(Cmd.BYE, {})
            return was_registered
        finally:
            self.sock.close(linger=200)
            self.sock = None

    def _ready_body(self) -> dict:
        return {"worker_id": self.worker_id, "boot_id": self.boot_id, "host": socket.gethostname(),
                "cores": len(self.config.cpus), "slots": len(self.slots), "version": PROTOCOL_VERSION,
                "nsd_version": __version__, "running": self._running(), "outbox": list(self.outbox.values())}

    def _running(self) -> list[list]:
        return [list(s.job) for s in self.slots if s.job] + [[t, a] for t, a, _ in self.backlog]

    def _send(self, cmd: Cmd, body: dict) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send_multipart(pack(cmd, body), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("send %s failed: %s", cmd.name, exc)

    async def _handle(self, msg) -> None:
        body = msg.body
        if msg.cmd is Cmd.READY_ACK:
            self.registered.set()
            log.info("registered with %s as %s (%d slots)", self.config.broker, self.worker_id, len(self.slots))
        elif msg.cmd is Cmd.ASSIGN:
            self._accept(body["trial_id"], body["attempt"], body["job"])
        elif msg.cmd is Cmd.RESULT_ACK:
            if self.outbox.pop(f"{body['trial_id']}#{body['attempt']}", None) is not None:
                self._save_outbox()
        elif msg.cmd is Cmd.CANCEL:
            await self._cancel(body["trial_id"], body["attempt"])
        elif msg.cmd is Cmd.DISCONNECT:
            if body.get("fatal"):
                self.fatal = f"the broker refused this worker: {body['reason']}"
                log.error(self.fatal)
            else:
                log.info("broker asked us to register again: %s", body["reason"])
                self.registered.clear()
                self._send(Cmd.READY, self._ready_body())
        # HEARTBEAT: hearing it is all it is for.

    def _accept(self, trial_id: str, attempt: int, job: dict) -> None:
        if any(s.job == (trial_id, attempt) for s in self.slots) or any(
                (t, a) == (trial_id, attempt) for t, a, _ in self.backlog):
            return  # a duplicate ASSIGN: we already run it
        slot = next((s for s in self.slots if s.job is None), None)
        if slot is None:
            self.backlog.append((trial_id, attempt, job))
            return
        slot.job = (trial_id, attempt)
        slot.task = asyncio.create_task(self._execute(slot, trial_id, attempt, job))

    async def _execute(self, slot: Slot, trial_id: str, attempt: int, job: dict) -> None:
        try:
            try:
                answer = await slot.runner.run(job)
            except RunnerDied as exc:
                answer = {"ok": False, "error": f"{exc} while running {job['kind']} {trial_id}",
                          "log_tail": slot.runner.log_tail()}
            except (OSError, ValueError) as exc:  # the pipe broke under us
                answer = {"ok": False, "error": f"runner pipe failed: {exc}", "log_tail": slot.runner.log_tail()}
            result = {**answer, "trial_id": trial_id, "attempt": attempt, "worker_id": self.worker_id}
            self.outbox[f"{trial_id}#{attempt}"] = result
            self._save_outbox()
            self._send(Cmd.RESULT, result)
        finally:
            slot.job, slot.task = None, None
            if self.backlog and not self._stopping.is_set():
                self._accept(*self.backlog.pop(0))

    async def _cancel(self, trial_id: str, attempt: int) -> None:
        self.backlog = [b for b in self.backlog if (b[0], b[1]) != (trial_id, attempt)]
        for slot in self.slots:
            if slot.job == (trial_id, attempt):
                # INC calls cannot be interrupted: end the runner; the next job starts a fresh one.
                task = slot.task
                task.cancel()
                await slot.runner.stop(kill=True)
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                log.info("cancelled %s (attempt %d)", trial_id, attempt)

    async def _shutdown(self) -> None:
        for slot in self.slots:
            if slot.task is not None:
                slot.task.cancel()
        await asyncio.gather(*(s.runner.stop(kill=s.job is not None) for s in self.slots), return_exceptions=True)
        self.ctx.term()


def _slot_cpus(cpus: list[int], slot: int, k: int) -> list[int]:
    return cpus[slot * k:(slot + 1) * k] or cpus[:k]
