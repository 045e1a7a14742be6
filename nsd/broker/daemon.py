"""The broker daemon: sockets around `nsd.broker.core.Core`.

ROUTER for clients (request/reply), ROUTER for workers (credit-based job flow, heartbeats), XPUB for task
events. One loop turn takes what is waiting on a ROUTER (at most `limits.batch` messages), checks every
message against `nsd.protocol`'s schemas, applies the batch in one SQLite transaction (each message in a
savepoint of its own, so one bad message cannot undo the others), schedules once, commits, and only then
sends what the batch produced: replies, acknowledgements, assignments, events. A failed commit answers the
batch's clients with the storage error and asks its workers to register again (they keep their results
in their outboxes); the loop goes on serving reads. In a broker pair (nsd/broker/peer.py) effects wait
until the passive broker has the commit. It never imports torch.

Its parts: what a client request gets (nsd/broker/client_requests.py) and what a worker message does
(nsd/broker/worker_messages.py); this module is the sockets, the loop turn and the timers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from nsd import __version__
from nsd.broker.blobs import BlobStore
from nsd.broker.client_requests import ClientRequests
from nsd.broker.config import BrokerConfig
from nsd.broker.core import Core, Event, ToWorker
from nsd.broker.erasure import Checkpoint, RemoveBlob
from nsd.broker.metrics import BrokerState, Metrics, MetricsServer
from nsd.broker.store import StorageError, Store
from nsd.broker.worker_messages import WorkerMessages
from nsd.limits import raise_open_files_limit
from nsd.liveness import timing_problem
from nsd.net import OncePerPeer, Readable, configure, is_loopback, send_frames_now
from nsd.protocol import CLIENT_TO_BROKER, WORKER_TO_BROKER, Cmd, Message, ProtocolError, event_frames, pack, unpack
from nsd.security import SOCKET_DOMAINS, CurveServer
from nsd.states import TaskState
from nsd.systemd import notify, watchdog_interval

log = logging.getLogger("nsd.broker")
_HEARTBEAT = pack(Cmd.HEARTBEAT)  # the same frames for every worker
_IDLE_HEARTBEAT = pack(Cmd.HEARTBEAT, {"running": []})  # an idle worker's, byte for byte
_ASSIGN = bytes([Cmd.ASSIGN])
_IDLE_GATHER_S = 0.02

READS = frozenset({Cmd.HELLO, Cmd.STATUS, Cmd.LIST, Cmd.RESULT_GET, Cmd.CLUSTER, Cmd.BLOB_HAVE, Cmd.BLOB_GET,
                   Cmd.LOGS})  # client requests that change nothing (but the audit log): answered again after a
# failed commit, without writing their audit entry then
RETENTION_EVERY_S = 60.0  # how often finished tasks are checked against their retention


class Broker(ClientRequests, WorkerMessages):
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        # CURVE: every socket encrypted and authenticated, workers and clients from separate allowlists.
        self.curve = CurveServer(Path(config.curve_secret), Path(config.keys_dir) if config.keys_dir else
                                 self.state_dir / "keys") if config.curve_secret else None
        for endpoint in (config.clients, config.workers, config.events, *([config.peer_bind] if config.peer else [])):
            if not is_loopback(endpoint) and not config.insecure and self.curve is None:
                raise ValueError(f"refusing to bind {endpoint}: it is reachable from other hosts and CURVE is not "
                                 f"set up; give --curve-secret (see `nsd keys`), bind 127.0.0.1, or pass "
                                 f"--insecure on a trusted network")
        if (why := timing_problem(config.heartbeat_s, config.liveness)) is not None:
            raise ValueError(f"refusing to start: {why} (the range every worker accepts)")
        self.addresses = {"clients": config.clients, "workers": config.workers, "events": config.events}
        self.heartbeat_s, self.liveness = config.heartbeat_s, config.liveness
        self.limits = config.limits
        self.metrics_address = config.metrics  # "host:port" for Prometheus, or None
        self.metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        self._watchdog_s = watchdog_interval()
        self._last_watchdog = 0.0
        self.endpoints: dict[str, str] = {}
        self._bad = OncePerPeer(log)
        self._loops: list[asyncio.Task] = []
        self._shadows: dict[str, zmq.Socket] = {}
        self._readable: dict[str, Readable] = {}
        self._unsent_assigns: list[tuple[bytes, str, int]] = []  # (worker, job id, attempt): its queue was full
        self.ctx: zmq.asyncio.Context | None = None
        self.store: Store | None = None
        self.core: Core | None = None
        self.pair = None  # nsd.broker.peer.Pair: one of a broker pair (config.peer)

    # The model, for tests and tools that look inside.
    @property
    def tasks(self):
        return self.core.tasks

    @property
    def workers(self):
        return self.core.workers

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        raise_open_files_limit()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "nsd.sqlite3")
        self.blobs = BlobStore(self.state_dir / "blobs", max_blob_bytes=self.limits.max_blob_bytes,
                               max_store_bytes=self.limits.max_store_bytes,
                               uploads_per_peer=self.limits.uploads_per_peer,
                               max_open_uploads=self.limits.max_open_uploads, referenced=self.store.referenced_blobs)
        self.core = self.new_core()
        if self.config.peer:  # one of a pair: the state is loaded when (if) this broker starts to serve
            from nsd.broker.peer import Pair
            self.pair = Pair(self)
        else:
            self.core.load()
        self._next_retention = 0.0
        self.ctx = zmq.asyncio.Context()
        if self.curve is not None:
            self.curve.start(self.ctx)
            self.core.trusted_worker = self.curve.trusted_worker
            if moved := self.core.adopt_legacy_owners(self.curve.tenant_of):
                log.info("%d task(s) from before tenants now belong to their client keys' tenants", moved)
        self.clients = self._router()
        self.workers_sock = self._router()
        self.events = configure(self.ctx.socket(zmq.XPUB))
        self.events.setsockopt(zmq.SNDHWM, 10_000)  # a slow subscriber loses events (it re-snapshots), no more
        # Each subscription reaches us, with its peer's User-Id, and counts only once we grant it
        # (`_drain_subscriptions`): a tenant's subscription to another tenant's task receives nothing.
        self.events.setsockopt(zmq.XPUB_MANUAL, 1)
        for name, sock in (("clients", self.clients), ("workers", self.workers_sock), ("events", self.events)):
            if self.curve is not None:
                self.curve.apply(sock, SOCKET_DOMAINS[name])
            sock.bind(self.addresses[name])
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # Synchronous views of the ROUTERs: non-blocking receives and sends without asyncio futures.
        self._shadows = {name: zmq.Socket.shadow(sock.underlying) for name, sock in (
            ("clients", self.clients), ("workers", self.workers_sock), ("events", self.events))}
        for shadow in self._shadows.values():
            # Copy every frame into libzmq: pyzmq's zero-copy sends of large frames keep the Python bytes
            # alive until its garbage-collector thread runs, which under load lets queued chunks pile up.
            shadow.copy_threshold = 1 << 30
        self._readable = {name: Readable(shadow) for name, shadow in self._shadows.items()}
        if self.pair is not None:
            self.endpoints["peer"] = self.pair.start(self.ctx, self.curve)
        self._loops = [asyncio.create_task(coro) for coro in (
            self._serve("clients", CLIENT_TO_BROKER), self._serve("workers", WORKER_TO_BROKER),
            self._drain_subscriptions(), self._tick())]
        if self.metrics_address:
            host, _, port = self.metrics_address.rpartition(":")
            self.metrics.registry.register(BrokerState(self.metrics_state, asyncio.get_running_loop()))
            self._metrics_server = MetricsServer(self.metrics.registry, host or "127.0.0.1", int(port))
            self.endpoints["metrics"] = "http://{}:{}/metrics".format(*self._metrics_server.address)
        log.info("broker %s serving clients %s, workers %s, events %s (state in %s)", __version__,
                 self.endpoints["clients"], self.endpoints["workers"], self.endpoints["events"], self.state_dir)
        notify("READY=1", f"STATUS=serving clients on {self.endpoints['clients']}")

    def new_core(self) -> Core:
        return Core(self.store, self.metrics, self.heartbeat_s, self.liveness, self.blobs, self.limits,
                    curve=self.curve is not None, share_cache=self.config.share_cache)

    def _router(self) -> zmq.asyncio.Socket:
        sock = configure(self.ctx.socket(zmq.ROUTER))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable or full peer raises instead of blocking
        # No ROUTER_HANDOVER: a second connection with a live peer's identity is refused by libzmq, so
        # nobody takes over a worker's id while it is connected. ZMTP heartbeats close dead connections,
        # so a worker restarted on a host that vanished gets its id back within two deadline windows.
        sock.setsockopt(zmq.SNDHWM, self.limits.peer_queue)  # bytes queued per peer <= this × one chunk
        # Pings inside libzmq only close connections to hosts that vanished (a dead process's connection
        # closes at once): one per deadline window is enough, and each costs the I/O thread a wake-up.
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_s * self.liveness * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_s * self.liveness * 1000))
        return sock

    async def stop(self) -> None:
        notify("STOPPING=1")
        if self._metrics_server is not None:
            await self._metrics_server.close()
            self._metrics_server = None
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self.pair is not None:
            await self.pair.stop()
        if self.ctx is not None:
            for readable in self._readable.values():
                readable.close()
            self._readable = {}
            self._shadows = {}  # views of the sockets below: closing those closes them
            for sock in (self.clients, self.workers_sock, self.events):
                sock.close(linger=0)
            if self.curve is not None:
                await self.curve.stop()
            self.ctx.term()
            self.ctx = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def reload(self) -> None:
        """Re-read what can change while running: the CURVE key allowlists (new connections only)."""
        if self.curve is not None:
            counts = self.curve.reload()
            log.info("reloaded key allowlists: %s", counts)

    # ---- the message loop --------------------------------------------------------------------------

    async def _serve(self, name: str, allowed: frozenset[Cmd]) -> None:
        """One socket's loop: wait for a message, take what else is already waiting (at most `batch`), and
        handle them as one turn. Frames are copied to bytes, unless CURVE needs each frame's User-Id."""
        shadow, readable, copy = self._shadows[name], self._readable[name], self.curve is None
        idle_heartbeats = copy and name == "workers"  # on the clients socket a HEARTBEAT is refused at the door
        while True:
            await readable.wait()
            batch = []
            for _ in range(self.limits.batch):
                try:
                    frames = shadow.recv_multipart(zmq.NOBLOCK, copy=copy)
                except zmq.Again:
                    break
                if idle_heartbeats and frames[1:] == _IDLE_HEARTBEAT:  # most of an idle cluster's traffic: no decoding
                    self._heard(frames[0], None)
                    continue
                batch.append(self._check(name, frames, allowed))
            batch = [item for item in batch if item is not None and not self._heartbeat(*item)]
            if self.pair is not None:  # a broker that does not serve answers "not active" (or takes over)
                batch = self.pair.admit(batch)
            if not batch:
                if name == "workers" and self.core.idle():
                    # Nothing runs or waits, so nothing a worker says is urgent: let heartbeats gather
                    # for a few milliseconds and take them in one turn, not one wake-up each.
                    await readable.gather(_IDLE_GATHER_S)
                continue
            try:
                self._handle(batch)
            except Exception:  # a bug of ours must not end the loop: log it and serve the next turn
                log.exception("a loop turn failed")
            # Let the other socket, the heartbeats and the watchdog run between turns, or a flood on one
            # socket starves everything else.
            await asyncio.sleep(0)

    def _check(self, name: str, frames: list, allowed: frozenset[Cmd]):
        parts = frames if self.curve is None else [f.bytes for f in frames]
        identity = parts[0]
        try:
            msg = unpack(parts[1:], allowed)
        except ProtocolError as exc:
            self._bad(identity, str(exc))
            if name == "clients" and exc.req is not None:  # a client is told what was wrong
                self._to_client(identity, Cmd.ERROR, {"req": exc.req, "error": str(exc)})
            return None
        key = None
        if self.curve is not None:
            try:
                key = frames[1].get("User-Id")  # the peer's CURVE public key, set by the ZAP handler
            except zmq.ZMQError:
                key = None
        return name, identity, key, msg

    def _heartbeat(self, name: str, identity: bytes, key: str | None, msg: Message) -> bool:
        """A worker's heartbeat: it changes nothing but when we last heard from it, so it skips the turn's
        transaction and scheduling (1,000 idle workers send 1,000 a second)."""
        if msg.cmd is not Cmd.HEARTBEAT:
            return False
        self._heard(identity, key)
        return True

    def _heard(self, identity: bytes, key: str | None) -> None:
        worker = self.core.worker_for(identity, key)
        if worker is not None:
            self.core.heard(worker)  # a congested worker reads again: placed on at the next tick
        else:  # we restarted, or declared it dead: it must register again
            self._to_worker(identity, Cmd.DISCONNECT, {"reason": "unknown worker: register again"})

    def _handle(self, batch: list[tuple[str, bytes, str | None, Message]]) -> None:
        """One loop turn: the batch in one transaction, then its effects (see the module docstring)."""
        core = self.core
        replies: dict[int, tuple[bytes, Cmd, dict]] = {}  # position in the batch -> reply
        try:
            with core.tx():
                for i, (name, identity, key, msg) in enumerate(batch):
                    if name == "clients" and msg.cmd is Cmd.BLOB_GET:  # a chunk: sent at once, never held
                        self._to_client(*self._client_message(identity, key, msg), now=True)
                    elif name == "clients":
                        replies[i] = self._client_message(identity, key, msg)
                    else:
                        self._worker_message(identity, key, msg)
                core.schedule()
        except StorageError as exc:
            self.metrics.storage_errors.inc()
            log.error("%s: %d messages of this turn were not applied", exc, len(batch))
            for i, (name, identity, key, msg) in enumerate(batch):
                if name == "clients" and msg.cmd is Cmd.BLOB_GET:
                    continue  # answered already
                if name == "clients" and msg.cmd in READS:  # answered again from the restored state
                    core.auditing = False
                    try:
                        replies[i] = self._client_message(identity, key, msg)
                    finally:
                        core.auditing = True
                elif name == "clients":  # an upload's chunk stays on disk, but not whose it is: sent again
                    replies[i] = (identity, Cmd.ERROR, {"req": msg.body["req"], "error": str(exc)})
                elif msg.cmd in (Cmd.READY, Cmd.RESULT):  # it keeps unacknowledged results: it will resend them
                    worker = core.workers.get(identity.decode("ascii", "replace"))
                    if worker is not None:
                        core._forget_worker(worker)
                    core.send(identity, Cmd.DISCONNECT, {"reason": str(exc)})
        for i, reply in replies.items():
            msg = batch[i][3]  # a completed upload is answered once the passive broker of a pair has it too
            blob = msg.body["sha256"] if msg.cmd is Cmd.BLOB_PUT and reply[2].get("complete") else None
            self._to_client(*reply, blob=blob)
        self._flush()

    def _send(self, name: str, frames: list[bytes]) -> bool:
        sent = send_frames_now(self._shadows[name], frames)
        self._readable[name].poke()  # the send may have taken the socket's "look again" signal
        if not sent and name == "workers" and frames[2] == _ASSIGN:  # our own frames: [identity, *pack()]
            job = msgpack.unpackb(frames[3])
            self._unsent_assigns.append((frames[0], job["trial_id"], job["attempt"]))
        return sent

    def _out(self, name: str, frames: list[bytes], blob: str | None = None) -> bool:
        """An effect of a commit: sent now, or (the active broker of a pair) once the passive one has it."""
        return self._send(name, frames) if self.pair is None else self.pair.out(name, frames, blob)

    def _to_client(self, identity: bytes, cmd: Cmd, body: dict, now: bool = False, blob: str | None = None) -> None:
        if self.pair is not None:
            body = {**body, "epoch": self.pair.epoch}
        frames = [identity, *pack(cmd, body)]
        if not (self._send("clients", frames) if now else self._out("clients", frames, blob)):
            self.metrics.dropped_sends.inc()  # client gone or not reading: its queue is full

    def _to_worker(self, identity: bytes, cmd: Cmd, body: dict, held: bool = False, blob: str | None = None) -> None:
        frames = [identity, *pack(cmd, body)]
        if not (self._out("workers", frames, blob) if held else self._send("workers", frames)):
            self.metrics.dropped_sends.inc()  # a peer that does not read: its queue is full

    def _flush(self) -> None:
        effects, self.core.effects = self.core.effects, []
        now = time.time()
        for effect in effects:
            if isinstance(effect, ToWorker):
                if effect.cmd is Cmd.HEARTBEAT:  # carries no state: never held
                    sent = self._send("workers", [effect.identity, *_HEARTBEAT])
                else:
                    body = effect.body if self.pair is None or effect.cmd is not Cmd.READY_ACK else \
                        {**effect.body, "epoch": self.pair.epoch}
                    sent = self._out("workers", [effect.identity, *pack(effect.cmd, body)])
                if sent:
                    worker = self.core.workers.get(effect.identity.decode("ascii", "replace"))
                    if worker is not None:
                        worker.last_sent = now
                else:
                    self.metrics.dropped_sends.inc()
            elif isinstance(effect, Event):
                self._out("events", event_frames(effect.task_id, effect.body))  # a lagging subscriber re-snapshots
            elif isinstance(effect, RemoveBlob):
                self.blobs.remove(effect.sha256)
            elif isinstance(effect, Checkpoint):
                try:
                    self.store.checkpoint()
                except Exception as exc:  # a busy or failing disk: the WAL is truncated at a later one
                    log.warning("WAL checkpoint after an erasure failed: %s", exc)
        if self._unsent_assigns:
            self._take_back_unsent()

    def _take_back_unsent(self) -> None:
        """ASSIGNs that a worker's full queue refused (a burst to a worker of many slots): the jobs wait
        again for a slot, the worker takes no more until it is heard from (it reads again), and what that
        changed goes out now."""
        unsent, self._unsent_assigns = self._unsent_assigns, []
        log.warning("%d ASSIGNs found their worker's queue full: taken back", len(unsent))
        try:
            with self.core.tx():
                for identity, jid, attempt in unsent:
                    self.core.unsent_assign(identity.decode("ascii", "replace"), jid, attempt)
                self.core.schedule()  # on other workers, where one is free
        except StorageError as exc:  # the leases stay; lost at the worker's next registration or liveness
            self.metrics.storage_errors.inc()
            log.error("%s (taking back %d unsent jobs)", exc, len(unsent))
        self._flush()

    # ---- time ---------------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s / 2)
            now = time.time()
            if self.pair is not None and not self.pair.tick(now):  # it does not serve: no timers of the core
                self._ping_systemd()
                continue
            try:
                self.core.check_liveness(now)
                self.core.check_timeouts(now)
                self.blobs.expire(time.monotonic())
                if now >= self._next_retention and (self.config.retention_days or self.config.tenant_retention):
                    self._next_retention = now + RETENTION_EVERY_S
                    self.core.expire(now, self.config.retention_days, self.config.tenant_retention)
                with self.core.tx():
                    self.core.schedule()
            except StorageError as exc:
                self.metrics.storage_errors.inc()
                log.error("%s (timers will try again)", exc)
            except Exception:
                log.exception("tick failed")
            self._flush()
            for readable in self._readable.values():
                readable.poke()  # a safety net: no message waits longer than a tick for its loop
            self._ping_systemd()

    def healthy(self) -> bool:
        """Whether the broker can serve: its message loop turns and SQLite answers. Otherwise the watchdog
        ping stops, and systemd restarts the broker."""
        if not self._loops or any(loop.done() for loop in self._loops):
            return False
        try:
            self.store.check()
        except Exception:
            return False
        return True

    def _ping_systemd(self) -> None:
        """WATCHDOG=1 from the loop itself, only while healthy: if it wedges, systemd restarts us."""
        now = time.monotonic()
        if self._watchdog_s is not None and now - self._last_watchdog >= self._watchdog_s and self.healthy():
            self._last_watchdog = now
            busy = sum(len(w.running) for w in self.core.workers.values())
            notify("WATCHDOG=1", f"STATUS={self.core.n_active()} active tasks, {len(self.core.workers)} workers, "
                                 f"{busy}/{sum(w.slots for w in self.core.workers.values())} slots busy")

    def metrics_state(self) -> dict:
        """What the metrics' gauges show (nsd/broker/metrics.py `BrokerState`), read on the loop."""
        by_state: dict[str, int] = {s.value: 0 for s in TaskState}
        for task in self.core.tasks.values():
            by_state[task.state.value] += 1
        workers = self.core.workers.values()
        return {"tasks": by_state, "workers": len(workers), "slots": sum(w.slots for w in workers),
                "busy": sum(len(w.running) for w in workers), "bad_messages": self._bad.count,
                "queue_depth": sum((t.state is TaskState.QUEUED) + t.n_pending for t in self.core.active()),
                **({"pair": self.pair.metric_values()} if self.pair is not None else {})}
