"""What travels over a broker pair's link once the states are settled (`nsd.broker.peer`).

`Stream`, on the serving broker: each committed transaction's record (`PEER_TX`, a window of them in
flight, resent from the passive's last acknowledged lsn when the link stalls), a snapshot when the
passive's point is not in our history, the snapshot's and blobs' chunks it fetches, blob names (a listing
it asks for, and each blob as it completes).

`Copy`, on the passive broker: applies records in order (acknowledging each once written), fetches and
installs a snapshot, lists the serving broker's blobs and pulls those it lacks. It calls its copy *whole*
(it may take over) once its point is confirmed, every blob is here and it has what the serving broker
committed while it acted alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING

from nsd.blobs import CHUNK_BYTES, is_sha256
from nsd.broker import replication
from nsd.broker.blobs import BlobError
from nsd.broker.pair import PairState, Side
from nsd.broker.store import Store
from nsd.protocol import Cmd
from nsd.transfer import receive_chunks

if TYPE_CHECKING:
    from nsd.broker.peer import Pair

log = logging.getLogger("nsd.broker.pair")
WINDOW = 256  # records sent and not yet acknowledged
MAX_PARTIAL_BYTES = 256 << 20  # the parts of one record held until its last arrives
PULLS = 2  # blobs fetched at once


class Stream:
    def __init__(self, pair: Pair):
        self.pair = pair
        self.applied = 0  # the passive's acknowledged lsn
        self.sent = 0
        self.streaming = False
        self.last_progress = 0.0
        self.due_blobs: set[str] = set()  # told to the passive, not confirmed yet
        self.snapshot: dict | None = None

    def reset(self) -> None:
        self.streaming = False
        self.due_blobs.clear()
        self.applied = self.sent = 0

    def lost(self) -> None:
        """The passive went silent: when it returns it lists our blobs again, and we check its point."""
        self.streaming = False
        self.due_blobs.clear()

    def peer_state(self, peer: Side, resync: bool) -> None:
        if peer.state is not PairState.PASSIVE:
            self.streaming = False
            return
        if self.streaming and not resync:
            return
        after = None if resync else self.pair.log.after(peer.epoch, peer.lsn)
        if after is None:
            return self.offer_snapshot()
        self.applied = self.sent = peer.lsn
        self.streaming, self.last_progress = True, time.time()
        self.pair.send(Cmd.PEER_ACK, {"epoch": peer.epoch, "lsn": peer.lsn})  # "your point is in my history"
        self.pump()

    def pump(self) -> None:
        if not self.streaming:
            return
        while self.sent < self.pair.lsn and self.sent - self.applied < WINDOW:
            record = self.pair.log.get(self.sent + 1)
            if record is None:  # fell out of the replay log: the passive starts over from a snapshot
                self.streaming = False
                return self.offer_snapshot()
            for body in record.parts():
                if not self.pair.send(Cmd.PEER_TX, body):
                    return  # the link's queue is full: `tick` resends from the last acknowledged
            self.sent = record.lsn

    def tick(self, now: float) -> None:
        if not self.streaming:
            return
        stalled = now - self.last_progress > max(1.0, 2 * self.pair.heartbeat_s)
        if self.sent > self.applied and stalled:
            self.sent, self.last_progress = self.applied, now
        # Also when nothing is in flight: a send refused while the link was still connecting (pump returned
        # early) must be retried, or the passive waits for records that nothing sends.
        self.pump()

    def message(self, msg) -> None:
        body = msg.body
        if msg.cmd is Cmd.PEER_ACK:
            record = self.pair.log.get(body["lsn"])
            if self.applied < body["lsn"] <= self.sent and record is not None and record.epoch == body["epoch"]:
                self.applied, self.last_progress = body["lsn"], time.time()
                self.pair.release()
                self.pump()
        elif msg.cmd is Cmd.PEER_FETCH:
            self.pair.send(Cmd.PEER_CHUNK, self._chunk(body))
        elif msg.cmd is Cmd.PEER_LIST:
            names = self.pair.b.blobs.names(body["after"], 1000)
            self.pair.send(Cmd.PEER_BLOBS, {"sha256": names, "listing": True, "more": len(names) == 1000})
        elif msg.cmd is Cmd.PEER_HAVE:
            for sha in body["sha256"]:
                self.due_blobs.discard(sha)
                self.pair.blob_confirmed(sha)

    def tell_blob(self, sha: str) -> None:
        if self.pair.peer is not None and self.pair.silent_s(time.time()) < self.pair.window_s:
            self.due_blobs.add(sha)
            self.pair.send(Cmd.PEER_BLOBS, {"sha256": [sha]})

    def offer_snapshot(self) -> None:
        """A consistent copy of our database (taken between transactions), offered once per window; kept
        while the passive is fetching it."""
        now, snap = time.time(), self.snapshot
        if snap is None or now - snap["served"] > 2 * self.pair.window_s:
            path = self.pair.b.state_dir / "pair" / "snapshot.sqlite3"
            path.parent.mkdir(exist_ok=True)
            size, sha = replication.snapshot(self.pair.b.store.db, path)
            snap = self.snapshot = {"id": uuid.uuid4().hex, "epoch": self.pair.epoch, "lsn": self.pair.lsn,
                                    "size": size, "sha256": sha, "path": path, "served": now, "offered": 0.0}
            log.info("pair: the passive broker needs a snapshot: %d bytes at epoch %d, lsn %d", size,
                     snap["epoch"], snap["lsn"])
        if now - snap["offered"] >= self.pair.heartbeat_s:
            snap["offered"] = now
            self.pair.send(Cmd.PEER_SNAPSHOT, {k: snap[k] for k in ("id", "epoch", "lsn", "size", "sha256")})

    def _chunk(self, body: dict) -> dict:
        kind, name, offset = body["kind"], body["name"], body["offset"]
        reply = {"kind": kind, "name": name, "offset": offset}
        length = max(0, min(body["length"], CHUNK_BYTES))
        try:
            if kind == "blob":
                data, size = self.pair.b.blobs.read(name, offset, length)
            elif self.snapshot is not None and name == self.snapshot["id"]:
                self.snapshot["served"] = time.time()
                with open(self.snapshot["path"], "rb") as f:
                    f.seek(offset)
                    data, size = f.read(length), self.snapshot["size"]
            else:
                return {**reply, "error": "no such snapshot (a newer one is offered)"}
        except (BlobError, OSError) as exc:
            return {**reply, "error": str(exc)[:500]}
        return {**reply, "size": size, "data": data}


class Copy:
    def __init__(self, pair: Pair):
        self.pair = pair
        self.applier = replication.Applier(pair.b.store.db)
        self.partial: list[dict] = []
        self.partial_bytes = 0
        self.wants_snapshot = False
        self.confirmed = False  # the serving broker said our point is in its history
        self.mark = 0  # what the serving broker had committed while it acted alone: ours before we are whole
        self.fetching: str | None = None
        self.listed_all, self.listing_since, self.listing_after = False, None, ""
        self.queue: collections.deque[str] = collections.deque()
        self.pulls: dict[str, asyncio.Task] = {}
        self.replies: dict[tuple, asyncio.Future] = {}
        self.tasks: set[asyncio.Task] = set()

    def reset(self) -> None:
        for task in [*self.tasks, *self.pulls.values()]:
            task.cancel()
        self.tasks.clear(), self.pulls.clear(), self.queue.clear(), self.replies.clear()
        self.partial, self.partial_bytes = [], 0
        self.confirmed = self.listed_all = False
        self.fetching, self.listing_since, self.mark = None, None, 0
        self.applier = replication.Applier(self.pair.b.store.db)

    async def stop(self) -> None:
        tasks = [*self.tasks, *self.pulls.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def peer_state(self, peer: Side, reconnected: bool) -> None:
        if not peer.state.serving:
            return
        if peer.state is PairState.SOLO:
            self.mark = max(self.mark, peer.lsn)
            if reconnected and self.pair.whole:  # it acknowledged alone while we were away
                self._set_whole(False)
        if reconnected or self.listing_since is None and not self.listed_all:
            self._list("")

    def tick(self, now: float) -> None:
        if self.listing_since is not None and now - self.listing_since > self.pair.window_s:
            self._list(self.listing_after)  # the page never came: ask again
        self._pull_next()
        self._check_whole()

    def message(self, msg) -> None:
        peer = self.pair.peer
        if peer is None or not peer.state.serving:
            return  # records, snapshots and blobs come only from a serving broker
        body = msg.body
        if msg.cmd is Cmd.PEER_TX:
            self._tx(body)
        elif msg.cmd is Cmd.PEER_ACK:
            if (body["epoch"], body["lsn"]) == (self.pair.epoch, self.pair.lsn):
                self.confirmed = True
        elif msg.cmd is Cmd.PEER_SNAPSHOT:
            if self.fetching != body["id"]:
                self._spawn(self._fetch_snapshot(body))
        elif msg.cmd is Cmd.PEER_CHUNK:
            waiter = self.replies.pop((body["kind"], body["name"], body["offset"]), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)
        elif msg.cmd is Cmd.PEER_BLOBS:
            self._blobs(body)

    # ---- records ------------------------------------------------------------------------------------

    def _tx(self, body: dict) -> None:
        pair, lsn = self.pair, body["lsn"]
        if self.fetching is not None or self.wants_snapshot:
            return
        if lsn <= pair.lsn:
            return  # a resend of what we hold already
        if lsn != pair.lsn + 1 or body["part"] != len(self.partial):
            self.partial, self.partial_bytes = [], 0
            return  # a gap: the serving broker resends from our last acknowledgement
        try:
            self.applier.check(body)
            self.partial.append(body)
            self.partial_bytes += sum(map(replication.row_bytes, body["rows"]))
            if self.partial_bytes > MAX_PARTIAL_BYTES:
                raise replication.ReplicationError(f"transaction {lsn} is larger than {MAX_PARTIAL_BYTES} bytes")
            if not body["last"]:
                return
            parts, self.partial, self.partial_bytes = self.partial, [], 0
            self.applier.apply(body["epoch"], lsn, parts)
        except replication.ReplicationError as exc:
            log.error("pair: %s; asking the serving broker for a snapshot", exc)
            self.partial, self.partial_bytes, self.wants_snapshot = [], 0, True
            self._set_whole(False)
            return
        pair.epoch, pair.lsn = body["epoch"], lsn
        rows = [row for part in parts for row in part["rows"]]
        tables = {name: cols for part in parts for name, cols in part["tables"].items()}
        pair.log.add(replication.Record(body["epoch"], lsn, tables, rows, sum(map(replication.row_bytes, rows))))
        self.confirmed = True
        pair.send(Cmd.PEER_ACK, {"epoch": body["epoch"], "lsn": lsn})
        columns = tables.get("erasures") or []
        if "kind" in columns and "name" in columns:
            kind, name = columns.index("kind"), columns.index("name")
            self._erase_blobs(v[name] for t, _, v in rows if t == "erasures" and v is not None and v[kind] == "blob")

    def _erase_blobs(self, names) -> None:
        """An erasure unlinks, on the serving broker, the blob files nobody owns any more; that is an effect,
        not a row, so this copy does the same when the erasure's rows arrive, or once it is whole after a
        snapshot (README "Privacy")."""
        store, blobs = self.pair.b.store, self.pair.b.blobs
        unowned = [sha for sha in names if is_sha256(sha) and blobs.stored(sha) and not store.owners(sha)]
        named = store.referenced_blobs() if unowned else set()
        for sha in unowned:
            if sha not in named:  # the serving broker's rule (nsd/broker/erasure.py)
                try:
                    blobs.remove(sha)
                except OSError as exc:  # the copy is right; the file goes with the next erasure or when we serve
                    log.warning("pair: could not erase blob %s: %s", sha[:12], exc)

    # ---- snapshot -------------------------------------------------------------------------------------

    async def _fetch_snapshot(self, offer: dict) -> None:
        pair, b = self.pair, self.pair.b
        self.fetching = offer["id"]
        self._set_whole(False)
        incoming = b.state_dir / "pair" / "incoming.sqlite3"
        incoming.parent.mkdir(exist_ok=True)
        try:
            with open(incoming, "wb") as out:
                await receive_chunks(out, offer["sha256"], lambda offset: self._get("snapshot", offer["id"], offset), 4)
        except (ValueError, TimeoutError, OSError) as exc:
            log.warning("pair: fetching the snapshot failed (%s); waiting for the next offer", exc)
            self.fetching = None
            return
        if pair.serving:
            return
        b.store.close()
        replication.replace_database(b.state_dir / "nsd.sqlite3", incoming)
        b.store = Store(b.state_dir / "nsd.sqlite3")
        replication.ensure_pair_table(b.store.db, copy_ok=False)
        replication.write_pair(b.store.db, copy_ok=0)  # the snapshot's own flag is the serving broker's
        point = replication.read_pair(b.store.db)
        pair.epoch, pair.lsn = point.epoch, point.lsn
        pair.log.reset(point.epoch, point.lsn)
        b.core = b.new_core()
        log.info("pair: installed a snapshot of %d bytes at epoch %d, lsn %d", offer["size"], point.epoch, point.lsn)
        self.reset()
        self._set_whole(False)
        self.wants_snapshot = False
        self._list("")

    async def _get(self, kind: str, name: str, offset: int) -> dict:
        key = (kind, name, offset)
        fut = self.replies[key] = asyncio.get_running_loop().create_future()
        self.pair.send(Cmd.PEER_FETCH, {"kind": kind, "name": name, "offset": offset, "length": CHUNK_BYTES})
        try:
            return await asyncio.wait_for(fut, 2 * self.pair.window_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no {kind} chunk at offset {offset} from the serving broker") from None
        finally:
            self.replies.pop(key, None)

    # ---- blobs ----------------------------------------------------------------------------------------

    def _list(self, after: str) -> None:
        self.listed_all, self.listing_after, self.listing_since = False, after, time.time()
        self.pair.send(Cmd.PEER_LIST, {"after": after})

    def _blobs(self, body: dict) -> None:
        blobs, have = self.pair.b.blobs, []
        for sha in body["sha256"]:
            if blobs.stored(sha):
                have.append(sha)
            elif sha not in self.pulls and sha not in self.queue:
                self.queue.append(sha)
        if have and not body.get("listing"):
            self.pair.send(Cmd.PEER_HAVE, {"sha256": have})
        if body.get("listing") and self.listing_since is not None:
            if body.get("more") and body["sha256"]:
                self._list(body["sha256"][-1])
            else:
                self.listed_all, self.listing_since = True, None
        self._pull_next()

    def _pull_next(self) -> None:
        while self.queue and len(self.pulls) < PULLS:
            sha = self.queue.popleft()
            self.pulls[sha] = asyncio.create_task(self._pull(sha))

    async def _pull(self, sha: str) -> None:
        blobs = self.pair.b.blobs
        part = blobs.root / "partial" / f"{sha}.peer"
        try:
            with open(part, "wb") as out:
                await receive_chunks(out, sha, lambda offset: self._get("blob", sha, offset), 4)
            blobs.adopt(sha, part)
            self.pair.send(Cmd.PEER_HAVE, {"sha256": [sha]})
        except (ValueError, TimeoutError, OSError) as exc:
            log.warning("pair: could not copy blob %s… from the serving broker: %s", sha[:12], exc)
            part.unlink(missing_ok=True)
        finally:
            self.pulls.pop(sha, None)
            self._pull_next()
            self._check_whole()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- whole ----------------------------------------------------------------------------------------

    def _check_whole(self) -> None:
        pair = self.pair
        if pair.whole or pair.serving or pair.state is not PairState.PASSIVE:
            return
        if (self.confirmed and self.listed_all and not self.queue and not self.pulls and self.fetching is None
                and not self.wants_snapshot and pair.lsn >= self.mark):
            log.info("pair: our copy is whole (epoch %d, lsn %d): we may take over", pair.epoch, pair.lsn)
            self._set_whole(True)
            self._erase_blobs(pair.b.store.erasures()["blob"])  # erasures a snapshot brought

    def _set_whole(self, whole: bool) -> None:
        if whole != self.pair.whole:
            self.pair.whole = whole
            with contextlib.suppress(Exception):  # a disk that fails here fails the next apply too
                replication.write_pair(self.pair.b.store.db, copy_ok=int(whole))
