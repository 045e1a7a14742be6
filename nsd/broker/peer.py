"""A broker pair's link and this broker's place in it: the I/O around `nsd.broker.pair`'s decisions.

Each broker binds a ROUTER (`peer_bind`) that only its pair's other broker may use (under CURVE: the pair's
own key, in the ZAP domain `peers`; without: the configured peer's address), and connects a DEALER to the
other's (`peer`); each sends on its DEALER and reads its ROUTER. `PEER_STATE` goes out every half heartbeat
and drives the states; the serving broker streams each committed transaction (`nsd.broker.peer_sync`).

The broker calls in at four points: `admit` (requests that reach a broker that does not serve are answered
"not active", or make it take over; a newer epoch fences a serving one), `out` (every effect: sent now, or
held until the passive broker has written the transaction it follows), `tick`, and `status`.
Takeover is a restart: `Core.load()` from the copy, leases waiting one grace window for their workers.

Long module: the link's life (sockets, the states each message moves, takeover and step-down) and the
broker's four hooks into it read together: each hook's answer depends on the state the link keeps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import zmq

from nsd.broker import replication
from nsd.broker.pair import (PairState, Role, Side, cluster_still_hears, fenced, may_take_over, next_epoch,
                             on_peer_state, on_silence)
from nsd.broker.peer_sync import Copy, Stream
from nsd.net import OncePerPeer, Readable, configure, send_frames_now
from nsd.protocol import PEER_TO_PEER, PROTOCOL_VERSION, Cmd, ProtocolError, pack, unpack

if TYPE_CHECKING:
    from nsd.broker.daemon import Broker

log = logging.getLogger("nsd.broker.pair")
MAX_HELD = 100_000  # effects waiting for the passive broker; past it new ones are dropped (their peers retry)
NOT_ACTIVE = "this broker is the passive one of a pair; ask the other one"


class Pair:
    def __init__(self, broker: Broker):
        config = broker.config
        self.b = broker
        self.role = Role(config.role)
        self.peer_endpoint, self.bind_endpoint = config.peer, config.peer_bind
        self.heartbeat_s, self.window_s = config.heartbeat_s, config.heartbeat_s * config.liveness
        self.state = PairState.PENDING
        self.peer: Side | None = None
        self.peer_heard = 0.0  # time.time() of the peer's last message
        self.peer_confirmed = 0.0  # ... of its last one that showed it hears us too (the link works both ways)
        self.started = time.time()
        self.workers_when_heard = 0  # workers registered with us when the peer last spoke
        self.last_client = 0.0
        self.carried: dict[bytes, int] = {}  # worker identity -> the epoch its READY carried
        self.held: collections.deque = collections.deque()  # (lsn, socket name, frames)
        self.blob_held: dict[str, list] = {}  # sha -> [(lsn, socket name, frames)]: waiting for the blob too
        self.takeovers = self.stepdowns = 0
        self._bad = OncePerPeer(log)
        self._problems: set[str] = set()
        self._loop_task: asyncio.Task | None = None
        self.router = self.dealer = None
        store = broker.store
        replication.ensure_pair_table(store.db, copy_ok=self.role is Role.PRIMARY)
        self.schema = replication.schema_id(replication.replicated_tables(store.db))
        point = replication.read_pair(store.db)
        self.epoch, self.lsn, self.whole = point.epoch, point.lsn, point.copy_ok
        self.log = replication.ReplayLog(self.epoch, self.lsn)
        self.stream = Stream(self)
        self.copy = Copy(self)
        broker.blobs.on_stored = self.blob_stored
        broker.blobs.referenced = lambda: self.b.store.referenced_blobs()  # the store is reopened on a snapshot
        self._peer_hosts = _addresses(self.peer_endpoint)

    # ---- what the decisions see ------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self.state.serving

    def me(self) -> Side:
        workers = len(self.b.core.workers) if self.serving else 0
        return Side(self.role, self.state, self.epoch, self.lsn, self.whole, workers)

    def silent_s(self, now: float) -> float:
        """Since we last heard the peer: what a broker that does not serve may take over after."""
        return now - max(self.peer_heard, self.started)

    def unconfirmed_s(self, now: float) -> float:
        """Since the peer last showed it hears us: what a serving broker counts, since a peer that does not
        hear us may take over however well we hear it."""
        return now - max(self.peer_confirmed, self.started)

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self, ctx: zmq.Context, curve) -> str:
        self.router = configure(ctx.socket(zmq.ROUTER))
        self.router.setsockopt(zmq.RCVHWM, 10_000)
        self.dealer = configure(ctx.socket(zmq.DEALER))
        self.dealer.setsockopt(zmq.IDENTITY, self.role.value.encode())
        self.dealer.setsockopt(zmq.SNDHWM, 10_000)  # records in flight are bounded by the stream's window
        # Queue nothing for a peer that is not connected: a state sent while it was away would reach it
        # later as if it were news (and the stream resends from its last acknowledgement anyway).
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        for sock in (self.router, self.dealer):
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.window_s * 1000))  # close a connection to a vanished host
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.window_s * 1000))
        if curve is not None:
            curve.apply(self.router, "peers")
            curve.peer_keys().apply(self.dealer)
        self.router.bind(self.bind_endpoint)
        self.dealer.connect(self.peer_endpoint)
        self._shadow = zmq.Socket.shadow(self.router.underlying)
        self._out = zmq.Socket.shadow(self.dealer.underlying)
        self._readable = Readable(self._shadow)
        self._loop_task = asyncio.create_task(self._read())
        log.info("pair: %s, peer %s, listening on %s (epoch %d, lsn %d%s)", self.role.value, self.peer_endpoint,
                 self.bind_endpoint, self.epoch, self.lsn, "" if self.whole else ", not a whole copy")
        return self.router.getsockopt_string(zmq.LAST_ENDPOINT)

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        await self.copy.stop()
        if self.router is not None:
            self._readable.close()
            self.router.close(linger=0)
            self.dealer.close(linger=0)
            self.router = self.dealer = None

    # ---- the broker's hooks ---------------------------------------------------------------------------

    def admit(self, batch: list) -> list:
        """The messages of a turn this broker may handle. A serving broker that meets a newer epoch steps
        down first; one that does not serve answers "not active", unless the message is the witness that
        lets it take over (`pair.may_take_over`)."""
        now, kept = time.time(), []
        for item in batch:
            name, identity, _, msg = item
            body = msg.body
            carried = body.get("epoch", 0) if name == "clients" or msg.cmd is Cmd.READY else 0
            if name == "clients" and carried == self.epoch:
                self.last_client = now  # a client that has been with us: a witness that we are not cut off
            elif msg.cmd is Cmd.READY:
                self.carried[identity] = carried
            if fenced(self.me(), carried):
                self.step_down(f"a {name[:-1]} came with epoch {carried}, newer than ours ({self.epoch})")
            if not self.serving:
                worker = name == "workers" and msg.cmd is Cmd.READY
                peer_workers = self.peer.workers if self.peer is not None else 0
                if (name == "clients" or worker) and may_take_over(
                        self.me(), self.silent_s(now), self.window_s, body.get("failover") is True, worker,
                        peer_workers, carried):
                    self.serve(f"the peer is silent for {self.silent_s(now):.1f}s and a {name[:-1]} lost it")
                else:
                    self._not_active(name, identity, msg)
                    continue
            kept.append(item)
        return kept

    def _not_active(self, name: str, identity: bytes, msg) -> None:
        if name == "clients":
            self.b._send(name, [identity, *pack(Cmd.ERROR, {"req": msg.body["req"], "error": NOT_ACTIVE,
                                                            "not_active": True, "epoch": self.epoch})])
        else:
            self.b._send(name, [identity, *pack(Cmd.DISCONNECT, {"reason": NOT_ACTIVE, "not_active": True})])

    def out(self, name: str, frames: list[bytes], blob: str | None = None) -> bool:
        """An effect of a committed transaction: sent now, or (active) held until the passive broker has
        written every transaction up to now — and, for `blob`, stored that blob."""
        if not self.state.holding:
            return self.b._send(name, frames)
        if len(self.held) + len(self.blob_held) >= MAX_HELD:
            return False  # counted as a dropped send
        entry = (self.lsn, name, frames)
        if blob is not None and blob in self.b.blobs.hidden:
            self.blob_held.setdefault(blob, []).append(entry)
        elif not self.held and self.stream.applied >= self.lsn:
            return self.b._send(name, frames)
        else:
            self.held.append(entry)
        return True

    def release(self) -> None:
        """Send what the passive broker has confirmed, in order."""
        applied = self.stream.applied
        while self.held and self.held[0][0] <= applied:
            _, name, frames = self.held.popleft()
            self.b._send(name, frames)

    def blob_stored(self, sha: str) -> None:
        """An upload completed here: hidden from clients until the passive broker has it too (while active)."""
        if self.state.holding:
            self.b.blobs.hidden.add(sha)
        if self.serving:
            self.stream.tell_blob(sha)

    def blob_confirmed(self, sha: str) -> None:
        self.b.blobs.hidden.discard(sha)
        for entry in self.blob_held.pop(sha, []):
            self.held.append(entry)
        self.release()

    def tick(self, now: float) -> bool:
        """Heartbeat the peer, judge its silence, move the stream or the copy on; whether we serve."""
        self.send(Cmd.PEER_STATE, self._state_body())
        silent = self.unconfirmed_s(now)
        if self.serving and silent >= self.window_s / 2:
            workers = [(w.registered, w.last_seen, self.carried.get(w.identity, 0)) for w in self.b.core.workers.values()]
            still = cluster_still_hears(now, self.peer_confirmed, self.heartbeat_s, self.window_s, self.epoch, workers,
                                        self.workers_when_heard, self.last_client)
            new = on_silence(self.me(), silent, self.window_s, still)
            if new is not self.state:
                log.warning("pair: the peer has been silent for %.1fs: %s", silent,
                            "our workers still reach us: serving alone (solo)" if new is PairState.SOLO else
                            "cut off, acknowledging nothing until it returns or our workers show we are not "
                            "the one cut off")
                self.enter(new)
        if len(self.carried) > 2 * len(self.b.core.workers) + 64:  # only registered workers' are of use
            self.carried = {w.identity: self.carried.get(w.identity, 0) for w in self.b.core.workers.values()}
        if self.silent_s(now) >= self.window_s:
            self.stream.lost()
        if self.serving:
            self.stream.tick(now)
        else:
            self.copy.tick(now)
        return self.serving

    def status(self) -> dict:
        now, peer = time.time(), self.peer
        view = {"role": self.role.value, "state": self.state.value, "epoch": self.epoch, "lsn": self.lsn,
                "whole": self.whole, "held": len(self.held) + sum(map(len, self.blob_held.values())), "peer": None}
        if peer is not None:
            applied = self.stream.applied if self.serving else peer.lsn
            view["peer"] = {"role": peer.role.value, "state": peer.state.value, "epoch": peer.epoch,
                            "lsn": applied, "whole": peer.whole, "heard_s": round(now - self.peer_heard, 3),
                            "behind": max(0, self.lsn - applied) if self.serving else None}
        return view

    def metric_values(self) -> dict:
        """What the pair's metrics show (nsd.broker.metrics.pair_families)."""
        view = self.status()
        peer = view["peer"] or {}
        return {"states": [state.value for state in PairState], "state": view["state"], "epoch": view["epoch"],
                "lsn": view["lsn"], "behind": peer.get("behind") or 0, "heard_s": peer.get("heard_s", -1),
                "held": view["held"], "takeovers": self.takeovers, "stepdowns": self.stepdowns}

    # ---- transitions ------------------------------------------------------------------------------------

    def enter(self, state: PairState) -> None:
        if state is self.state:
            return
        log.info("pair: %s -> %s (epoch %d, lsn %d)", self.state.value, state.value, self.epoch, self.lsn)
        was_holding, self.state = self.state.holding, state
        if was_holding and state is PairState.SOLO:  # acknowledged alone from now: everything held goes out
            self.b.blobs.hidden.clear()
            for entries in self.blob_held.values():
                self.held.extend(entries)
            self.blob_held.clear()
            while self.held:
                _, name, frames = self.held.popleft()
                self.b._send(name, frames)

    def serve(self, why: str) -> None:
        """Become the serving broker: a new epoch (its first transaction records it), then the state
        loaded from the copy as after a restart."""
        b, epoch = self.b, next_epoch(self.me(), self.peer)
        log.warning("pair: taking over as the serving broker, epoch %d: %s", epoch, why)
        capture = replication.Capture(b.store.db, self._on_record)
        capture.epoch = epoch
        capture.install()
        b.store.capture = capture
        try:
            with b.store.tx():
                b.store.db.execute("INSERT OR REPLACE INTO pair_terms (epoch, role, started) VALUES (?, ?, ?)",
                                   (epoch, self.role.value, time.time()))
                replication.write_pair(b.store.db, copy_ok=1)
        except Exception:
            capture.remove()
            b.store.capture = None
            raise
        self.epoch, self.whole = epoch, True
        self.takeovers += 1
        self.copy.reset()
        self.stream.reset()
        b.core = b.new_core()
        b.core.load()
        self.enter(PairState.SOLO)

    def step_down(self, why: str) -> None:
        """Serve no more: nothing held goes out (it was never acknowledged); the copy starts over from the
        serving broker once we hear it."""
        log.warning("pair: stepping down (epoch %d, lsn %d): %s", self.epoch, self.lsn, why)
        b = self.b
        if b.store.capture is not None:
            b.store.capture.remove()
            b.store.capture = None
        self.held.clear(), self.blob_held.clear(), b.blobs.hidden.clear()
        self.stepdowns += 1
        self.whole = False
        replication.write_pair(b.store.db, copy_ok=0)
        b.core = b.new_core()  # empty: a broker that does not serve holds no tasks or workers in memory
        self.stream.reset()
        self.copy.reset()
        self.state = PairState.PENDING

    def _on_record(self, record: replication.Record) -> None:
        self.lsn = record.lsn
        self.log.add(record)
        self.stream.pump()

    # ---- the link ---------------------------------------------------------------------------------------

    def send(self, cmd: Cmd, body: dict) -> bool:
        return self.dealer is not None and send_frames_now(self._out, pack(cmd, body))

    def _state_body(self) -> dict:
        me = self.me()
        return {"role": me.role.value, "state": me.state.value, "epoch": me.epoch, "lsn": me.lsn,
                "caught_up": me.whole, "workers": me.workers, "version": PROTOCOL_VERSION, "schema": self.schema,
                "hears_you": time.time() - self.peer_heard < self.window_s / 2,
                "resync": self.copy.wants_snapshot}

    async def _read(self) -> None:
        while True:
            await self._readable.wait()
            for _ in range(256):
                try:
                    frames = self._shadow.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._message(frames)
                except Exception:  # a bug of ours must not end the link
                    log.exception("pair: a peer message failed")
            await asyncio.sleep(0)

    def _message(self, frames: list) -> None:
        identity = frames[0].bytes
        if identity != self.role.other.value.encode() or not self._from_peer(frames[1]):
            self._bad(identity, "a message on the pair's socket from something that is not the configured peer")
            return
        try:
            msg = unpack([f.bytes for f in frames[1:]], PEER_TO_PEER)
        except ProtocolError as exc:
            self._bad(identity, str(exc))
            return
        if msg.cmd is Cmd.PEER_STATE:
            return self._peer_state(msg.body)
        if self.peer is None:
            return  # nothing but its state before we know what it is
        self._heard(confirmed=True)  # an answer to something of ours: it hears us
        if self.serving:
            self.stream.message(msg)
        else:
            self.copy.message(msg)

    def _heard(self, confirmed: bool) -> None:
        self.peer_heard = time.time()
        if confirmed:
            self.peer_confirmed = self.peer_heard
            if self.serving:
                self.workers_when_heard = len(self.b.core.workers)

    def _from_peer(self, frame: zmq.Frame) -> bool:
        """Without CURVE, the sender's address must be the configured peer's (with CURVE, ZAP let in only
        the pair's key)."""
        if self.b.curve is not None:
            return True
        with contextlib.suppress(zmq.ZMQError):
            return frame.get("Peer-Address") in self._peer_hosts
        return False

    def _peer_state(self, body: dict) -> None:
        problem = None
        if body["role"] != self.role.other.value:
            problem = f"the peer says it is the {body['role']} too: give the pair one primary and one backup"
        elif body["version"] != PROTOCOL_VERSION or body["schema"] != self.schema:
            problem = "the peer runs another nsd version (protocol or state schema): run the same on both"
        if problem is not None:
            self._bad.count += 1
            if problem not in self._problems:
                self._problems.add(problem)
                log.error("pair: ignoring the peer: %s", problem)
            return
        now = time.time()
        reconnected = self.peer is None or now - self.peer_heard >= self.window_s
        peer = Side(Role(body["role"]), PairState(body["state"]), body["epoch"], body["lsn"], body["caught_up"],
                    body["workers"], body["hears_you"])
        self.peer = peer
        self._heard(confirmed=peer.hears)
        new = on_peer_state(self.me(), peer, bool(self.stream.due_blobs))
        if self.serving and new is PairState.PENDING:
            self.step_down(f"the peer serves epoch {peer.epoch}, newer than ours ({self.epoch})")
        elif not self.serving and new.serving:
            self.serve(f"neither serves, and our history (epoch {self.epoch}, lsn {self.lsn}) is the newer")
        else:
            self.enter(new)
        if self.serving:
            self.stream.peer_state(peer, body.get("resync") is True)
        else:
            self.copy.peer_state(peer, reconnected)


def _addresses(endpoint: str) -> set[str]:
    """The addresses a tcp:// peer endpoint's host resolves to (what ZeroMQ reports as Peer-Address)."""
    host = urlsplit(endpoint).hostname if endpoint.startswith("tcp://") else None
    if not host:
        return set()
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}
