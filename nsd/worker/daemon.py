"""The worker daemon: registers with the broker, takes jobs by credit, runs them in runner processes.

It never imports torch: runners (`nsd.worker.runner`, handled through `nsd.worker.slots`) do the INC work
in their own processes, one per slot, pinned to the slot's cores. Heartbeats come from here, not from the
busy runner, so a long trial never makes the worker look dead. Results stay in an on-disk outbox until
the broker acknowledges them. Blob transfers are in `nsd.worker.transfers`.

Its life is one `WorkerState`; `run()` is `startup`, one `_session` per connection to the broker (each a
`main_loop` of `on_tick`s), and `shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio

from nsd import __version__
from nsd.endpoints import Endpoints
from nsd.liveness import heartbeat_due, timing_problem
from nsd.net import configure, send_now
from nsd.protocol import BROKER_TO_WORKER, PROTOCOL_VERSION, Cmd, ProtocolError, pack, unpack
from nsd.security import ClientKeys, HandshakeWatch, KeyFileError
from nsd.systemd import notify, watchdog_interval
from nsd.worker import checks
from nsd.worker.cache import BlobCache
from nsd.versions import installed_versions
from nsd.worker.hardware import describe as describe_hardware
from nsd.worker.config import WorkerConfig
from nsd.worker.job_flow import JobFlow
from nsd.worker.jobs import Erasures, Outbox
from nsd.worker.sandbox import runner_layout
from nsd.worker.slots import RunnerSetup, Slot, SlotPool
from nsd.worker.transfers import Transfers

log = logging.getLogger("nsd.worker")


class WorkerRefused(RuntimeError):
    """The broker refused this worker for good (wrong protocol version, inconsistent registration)."""


class WorkerState(str, enum.Enum):
    CONNECTING = "connecting"  # no READY_ACK on this connection yet: nothing is assigned to us
    REGISTERED = "registered"  # the broker acknowledged us: jobs come in, heartbeats go out
    DRAINING = "draining"  # stop() with a grace: no new jobs; running ones finish until the drain deadline
    STOPPING = "stopping"  # leaving now: what we still hold is handed back (BYE), runners are stopped
    REFUSED = "refused"  # the broker refused us for good (a fatal DISCONNECT): run() raises WorkerRefused

    @property
    def rank(self) -> int:
        """A worker only moves forward, except between connecting and registered."""
        return {"connecting": 0, "registered": 0, "draining": 1, "stopping": 2, "refused": 3}[self.value]


class WorkerDaemon(JobFlow):
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.cache_dir = Path(config.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.worker_id = config.worker_id or self._persistent_id()
        # One broker, or the two of a pair (nsd.endpoints); the pair's term we last saw is kept across restarts.
        self.endpoints = Endpoints(config.broker, epoch_file=self.cache_dir / "pair-epoch")
        self._not_active = False  # this session's broker said it is the passive one of a pair
        self.boot_id = uuid.uuid4().hex
        if bool(config.curve_key) != bool(config.server_key):
            raise KeyFileError("CURVE needs both this worker's key (--curve-key) and the broker's public key "
                               "(--server-key)")
        self.curve = ClientKeys.load(Path(config.curve_key), Path(config.server_key)) if config.curve_key else None
        self.cpus = list(config.cpus)
        self.shared_dirs = [os.path.realpath(d) for d in config.shared_dirs]
        lay = runner_layout(config.sandbox, config.shared_dirs, [self.cache_dir, config.curve_key, config.server_key],
                            self.cache_dir / "runners" / f"probe-{self.worker_id}")  # what runners see
        setup = RunnerSetup(lay, self.cache_dir / "blobs", self.cache_dir / "numba", config.preload,
                            tuple(config.runner_env))
        self.pool = SlotPool(self.cpus, config.cores_per_trial, self.cache_dir, self.worker_id, setup)
        self.blobs = BlobCache(self.cache_dir / "blobs", config.cache_max_bytes)
        self.blobs.clear_partial()
        self.transfers = Transfers(self._send, self.blobs, config.fetch_window, config.chunk_timeout_s)
        self.outbox = Outbox(self.cache_dir / f"outbox-{self.worker_id}.json")
        self.backlog: list[tuple[str, int, dict]] = []  # jobs assigned while every slot was busy
        self.cancelled: set[tuple[str, int]] = set()  # jobs cancelled while they run: their answers are dropped
        self.erased = Erasures(self.cache_dir, self.blobs, self.outbox)  # what the broker told us to erase
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self._watch: HandshakeWatch | None = None  # the connection's handshake (a refused key says so)
        self.refused: str | None = None  # why the broker refused the last connection's handshake, if it did
        self.state = WorkerState.CONNECTING
        self._refusal = ""  # the broker's reason, once REFUSED
        self._drain_deadline = 0.0  # monotonic time a DRAINING worker stops waiting for running jobs
        self._leaving = asyncio.Event()  # STOPPING or REFUSED: the reconnect backoff waits on it
        # This connection was acknowledged (READY_ACK): the state's REGISTERED, and while DRAINING whether
        # the broker still hears us. An Event because callers (tests, bench) wait for it.
        self.registered = asyncio.Event()
        self._watchdog_s = watchdog_interval()
        self._last_watchdog = 0.0
        # The broker's heartbeat interval and liveness (READY_ACK); ours until it has told us its own.
        self.heartbeat_s, self.liveness = config.heartbeat_s, config.liveness
        self.ignored = 0  # broker messages whose values failed a check (logged, then ignored)
        self.versions = installed_versions()
        self.hardware = describe_hardware(len(self.cpus), config.label)  # deployment figures belong to it

    @property
    def slots(self) -> list[Slot]:
        return self.pool.slots

    @property
    def fatal(self) -> str | None:
        """Why the broker refused this worker, once it has."""
        return self._refusal if self.state is WorkerState.REFUSED else None

    @property
    def taking_jobs(self) -> bool:
        return self.state.rank == 0

    def _enter(self, state: WorkerState) -> None:
        if state.rank < self.state.rank:
            return  # e.g. a READY_ACK while draining: registered again, still draining
        self.state = state
        if state in (WorkerState.STOPPING, WorkerState.REFUSED):
            self._leaving.set()

    def _persistent_id(self) -> str:
        """Stable across restarts, so that the broker's ROUTER_HANDOVER hands the old identity over."""
        path = self.cache_dir / "worker-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            wid = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            path.write_text(wid)
            return wid

    # ---- life: startup, sessions, shutdown -------------------------------------------------------

    async def run(self) -> None:
        """Serve until stop(); reconnect with backoff whenever the broker goes quiet."""
        await self.startup()
        backoff = self.config.heartbeat_s
        refused_since = None  # when a broker we came to as a failover witness first said "not active"
        try:
            while not self._leaving.is_set():
                healthy = await self._session()
                if self._leaving.is_set():
                    break
                backoff = self.config.heartbeat_s if healthy else min(backoff * 2, self.config.backoff_max_s)
                delay, lost = backoff, self.endpoints.current
                if self.endpoints.pair and not self.refused:
                    delay, refused_since = self._next_endpoint(healthy, refused_since, backoff)
                if self.refused:  # a key the broker does not (yet) allow: say so, and try again later
                    log.error("%s (broker at %s); trying again in %.0fs", self.refused, lost, delay)
                    notify(f"STATUS=refused by the broker at {lost}; retrying")
                else:
                    log.warning("%s %s; connecting to %s in %.1fs", "not the active broker:" if self._not_active else
                                "lost the broker at", lost, self.endpoints.current, delay)
                    notify(f"STATUS=lost the broker at {lost}; reconnecting")
                if self._drained():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._leaving.wait(), delay)
        finally:
            await self.shutdown()
        if self.fatal:
            raise WorkerRefused(self.fatal)

    def _next_endpoint(self, healthy: bool, refused_since: float | None, backoff: float) -> tuple[float, float | None]:
        """After a session with one broker of a pair: the other one at once when this one went silent (we
        are a witness that it is gone); when the one we came to as a witness is not active yet, the same one
        again each heartbeat for a window (it takes over once it too has missed the other long enough), then
        the other."""
        now, window = time.monotonic(), self.heartbeat_s * self.liveness
        if not self._not_active:
            self.endpoints.silent()
            return (0.0 if healthy else backoff), None
        if self.endpoints.failover and now - (refused_since or now) < window:
            return self.heartbeat_s, refused_since or now
        self.endpoints.refused()
        return self.heartbeat_s, None

    async def startup(self) -> None:
        await self.pool.start()  # warm: imports paid before work arrives
        notify("READY=1", f"STATUS=connecting to {self.endpoints.current}")

    async def shutdown(self) -> None:
        notify("STOPPING=1")
        await self.pool.close()
        self.ctx.term()

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: take no new jobs, give running ones `grace_s` (default config.grace_s) to finish and be
        acknowledged, hand the rest back to the broker, then exit. A second call stops at once."""
        grace = self.config.grace_s if grace_s is None else grace_s
        if not self.taking_jobs or grace <= 0:
            self._enter(WorkerState.STOPPING)
            return
        log.info("draining: no new jobs; waiting up to %.0fs for %d running", grace, self.pool.busy)
        self._drain_deadline = time.monotonic() + grace
        self._enter(WorkerState.DRAINING)

    def _drained(self) -> bool:
        """While draining: True once nothing runs and every result is acknowledged, or time is up."""
        if self.state is not WorkerState.DRAINING:
            return False
        return (not self.pool.busy and not self.outbox) or time.monotonic() > self._drain_deadline

    async def _session(self) -> bool:
        """One connection to the broker. Returns whether it got as far as being registered."""
        session = _Session(last_heard=time.monotonic())
        self._not_active = False
        self._connect()
        try:
            await self.main_loop(session)
            if self.state is WorkerState.STOPPING and self.registered.is_set():
                # Leaving on purpose (drain over, or a second SIGTERM): what we still hold is handed back,
                # not failed, so the broker requeues it without using up an attempt.
                self._send(Cmd.BYE, {"handback": True})
            return session.was_registered
        finally:
            self.refused = await self._watch.problem()
            self._watch.close()
            self.sock.close(linger=200)
            self.sock = None
            self.transfers.drop("the connection to the broker ended")

    async def main_loop(self, session: _Session) -> None:
        while not self._leaving.is_set() and not await self.on_tick(session):
            pass

    def _connect(self) -> None:
        self._set_registered(False)
        self.sock = configure(self.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        if self.curve is not None:
            self.curve.apply(self.sock)
        self._watch = HandshakeWatch(self.sock, "worker")  # before connecting: a refusal comes once
        self.sock.connect(self.endpoints.current)
        self.heartbeat_s, self.liveness = self.config.heartbeat_s, self.config.liveness
        self._send(Cmd.READY, self._ready_body())

    def _set_registered(self, yes: bool) -> None:
        if yes:
            self.registered.set()
            self._enter(WorkerState.REGISTERED)
        else:
            self.registered.clear()
            if self.state is WorkerState.REGISTERED:
                self.state = WorkerState.CONNECTING

    async def on_tick(self, session: _Session) -> bool:
        """One turn of a session: drain, hear the broker, heartbeat, feed the watchdog. True: it is over."""
        if self._not_active:
            return True
        if self.state is WorkerState.DRAINING:
            if not session.drain_announced and self.registered.is_set():
                # Registering again with no slots: the broker keeps what runs, assigns nothing more,
                # and requeues the backlog we drop here.
                self.backlog.clear()
                self._send(Cmd.READY, self._ready_body())
                session.drain_announced = True
            if self._drained():
                self._enter(WorkerState.STOPPING)
                return True
        if not self.registered.is_set() and await self._watch.problem() is not None:
            return True  # the broker refused the handshake: no answer will come on this connection
        # Read each turn: READY_ACK may have changed them to the broker's.
        hb, deadline = self.heartbeat_s, self.heartbeat_s * self.liveness
        # At most a second: the systemd watchdog is fed from this loop, whatever the interval.
        if await self.sock.poll(timeout=int(min(hb / 2, 1.0) * 1000)):
            session.last_heard = time.monotonic()
            await self._receive(await self.sock.recv_multipart())
            session.was_registered = session.was_registered or self.registered.is_set()
        now = time.monotonic()
        if now - session.last_heard > deadline:
            return True
        running = self._running()
        if self.registered.is_set() and heartbeat_due(now, session.last_sent, hb, self.liveness,
                                                      busy=bool(running or self.outbox)):
            self._send(Cmd.HEARTBEAT, {"running": running})
            session.last_sent = now
        if self._watchdog_s is not None and now - self._last_watchdog >= self._watchdog_s:
            self._last_watchdog = now  # from this loop: a wedged loop gets the daemon restarted
            notify("WATCHDOG=1", f"STATUS={'registered with' if self.registered.is_set() else 'connecting to'} "
                                 f"{self.endpoints.current}; {self.pool.busy} trials running on {len(self.cpus)} cores")
        return False

    async def _receive(self, frames: list[bytes]) -> None:
        try:
            msg = unpack(frames, BROKER_TO_WORKER)
        except ProtocolError as exc:  # refused by the protocol's own field checks
            return self._ignore("a message", str(exc))
        try:
            await self._handle(msg)
        except Exception:  # a value no check foresaw: one message lost, never the daemon
            self.ignored += 1
            log.exception("could not act on %s from the broker; ignored", msg.cmd.name)

    def _ready_body(self) -> dict:
        draining = self.state is WorkerState.DRAINING
        return {"worker_id": self.worker_id, "boot_id": self.boot_id, "host": socket.gethostname(),
                "cores": len(self.cpus), "slots": 0 if draining else self.pool.capacity,
                "cores_per_trial": self.pool.default_k,
                "version": PROTOCOL_VERSION,
                "nsd_version": __version__, "running": self._running(), "outbox": self.outbox.results(),
                "draining": draining,
                "versions": self.versions,  # what its runners import: part of the broker's metric cache key
                "hardware": self.hardware,
                **self.endpoints.extra()}  # a pair: the highest epoch seen; whether we came as a failover witness

    def _running(self) -> list[list]:
        return [list(s.job) for s in self.slots if s.job] + [[t, a] for t, a, _ in self.backlog]

    def _send(self, cmd: Cmd, body: dict) -> None:
        if self.sock is None:
            return
        if not send_now(self.sock, pack(cmd, body)):
            log.debug("send %s failed", cmd.name)

    def _ignore(self, what: str, why: str) -> None:
        self.ignored += 1
        if self.ignored <= 20 or self.ignored % 1000 == 0:  # a flood of bad messages must not fill the log
            log.warning("ignored %s from the broker: %s (%d ignored so far)", what, why[:500], self.ignored)

    # ---- messages --------------------------------------------------------------------------------

    async def _handle(self, msg) -> None:
        """Act on one broker message, each field's value checked first (nsd.worker.checks)."""
        body = msg.body
        if msg.cmd in (Cmd.ASSIGN, Cmd.CANCEL, Cmd.RESULT_ACK, Cmd.RULE):
            if (why := checks.lease(body["trial_id"], body["attempt"])) is not None:
                return self._ignore(msg.cmd.name, why)
        if msg.cmd is Cmd.READY_ACK:
            # Adopt the broker's timing: it declares us dead after heartbeat_s * liveness of silence and
            # pings at heartbeat_s, so our deadline and our own period must be the same numbers.
            liveness = body.get("liveness", self.liveness)
            if (why := timing_problem(body["heartbeat_s"], liveness)) is not None:
                self._ignore(msg.cmd.name, f"{why}; keeping {self.heartbeat_s:g}s x {self.liveness}")
            else:
                self.heartbeat_s, self.liveness = float(body["heartbeat_s"]), liveness
            self.endpoints.heard(body)
            self.endpoints.answered()
            self._set_registered(True)
            log.info("registered with %s as %s (%d cores, %d slots of %d)", self.endpoints.current, self.worker_id,
                     len(self.cpus), self.pool.capacity, self.pool.default_k)
            notify(f"STATUS=registered with {self.endpoints.current}; {self.pool.capacity} slots")
        elif msg.cmd is Cmd.ASSIGN:
            if (why := checks.job(body["trial_id"], body["job"])) is not None:
                self._ignore(msg.cmd.name, f"{body['trial_id']}: {why}")
                # Answered, not dropped: else the broker would wait on this lease for as long as we live.
                self._send(Cmd.RESULT, {"trial_id": body["trial_id"], "attempt": body["attempt"], "ok": False,
                                        "worker_id": self.worker_id, "error": f"the worker refused the job: {why}"})
                return
            self._accept(body["trial_id"], body["attempt"], body["job"])
        elif msg.cmd is Cmd.RESULT_ACK:
            self.outbox.acknowledged(body["trial_id"], body["attempt"])
        elif msg.cmd is Cmd.CANCEL:
            self._cancel(body["trial_id"], body["attempt"])
        elif msg.cmd is Cmd.RULE:
            if (why := checks.rule(body["rule"])) is not None:
                return self._ignore(msg.cmd.name, why)
            self._new_rule(body["trial_id"], body["attempt"], body["rule"])
        elif msg.cmd in (Cmd.CHUNK, Cmd.STORE_ACK):
            why = checks.chunk(body, self.config.cache_max_bytes) if msg.cmd is Cmd.CHUNK else checks.store_ack(body)
            if why is not None:
                self._ignore(msg.cmd.name, why)
                # A transfer waiting on this reply fails now with the reason, rather than at its timeout.
                body = {"error": f"bad {msg.cmd.name} from the broker: {why}"}
            self.transfers.reply(msg.cmd, msg.body, body)
        elif msg.cmd is Cmd.DROP:  # a deleted task's (names checked at the door: hashes and task ids)
            self.erased.drop(body["sha256"], body["tasks"])
        elif msg.cmd is Cmd.DISCONNECT:
            if (why := checks.disconnect(body)) is not None:
                return self._ignore(msg.cmd.name, why)
            if body.get("not_active") is True and self.endpoints.pair:  # the passive one of a pair
                self._not_active = True
            elif body.get("fatal"):
                self._refusal = f"the broker refused this worker: {body['reason'][:500]}"
                self._enter(WorkerState.REFUSED)
                log.error(self._refusal)
            else:
                log.info("broker asked us to register again: %s", body["reason"][:500])
                self._set_registered(False)
                self._send(Cmd.READY, self._ready_body())
        # HEARTBEAT: hearing it is all it is for.

@dataclass
class _Session:
    """What one connection to the broker keeps track of."""
    last_heard: float  # when the broker last spoke (monotonic): silence past the liveness deadline ends it
    last_sent: float = 0.0  # our last heartbeat
    was_registered: bool = False  # the broker acknowledged us at some point: reconnect without backoff
    drain_announced: bool = False  # our READY with no slots went out on this connection
