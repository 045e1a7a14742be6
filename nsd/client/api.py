"""AsyncClient: requests to the broker's client socket, Lazy Pirate style: one DEALER, a request id per
call, a timeout after which the socket is dropped and `BrokerUnavailable` raised.

Its other parts: uploads, downloads and fetch (nsd/client/transfers.py), the event stream
(nsd/client/events.py), erasure, audit and acting for a tenant (nsd/client/privacy.py); its blocking twin
`Client` is nsd/client/sync.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from nsd.blobs import parse_ref
from nsd.client.errors import BrokerError, BrokerRefused, BrokerUnavailable, NotActive, ReplyTooLarge
from nsd.client.events import EventStream
from nsd.client.privacy import Privacy
from nsd.client.specs import prepare_spec
from nsd.client.transfers import Transfers
from nsd.endpoints import Endpoints
from nsd.net import configure
from nsd.protocol import BROKER_TO_CLIENT, DEFAULT_ENDPOINTS, MAX_BODY, MAX_MESSAGE_BYTES, Cmd, ProtocolError, pack, unpack
from nsd.security import ClientKeys, HandshakeWatch, KeyFileError
from nsd.spec import PATH_FIELDS, TaskSpec

DEFAULT_BROKER = DEFAULT_ENDPOINTS["clients"]  # where `nsd broker` binds by default


class _Disconnected(Exception):
    """The request socket's connection closed while a reply was awaited."""


def broker_address(address: str | None = None) -> str:
    return address or os.environ.get("NSD_BROKER") or DEFAULT_BROKER


class AsyncClient(Transfers, EventStream, Privacy):
    def __init__(self, broker: str | None = None, timeout_s: float = 10.0, idle_resnapshot_s: float = 2.0,
                 reconnect_s: float = 300.0, curve_key: str | os.PathLike | None = None,
                 server_key: str | os.PathLike | None = None, ctx: zmq.asyncio.Context | None = None):
        self.endpoints = Endpoints(broker_address(broker))  # one broker, or the two of a pair
        if bool(curve_key) != bool(server_key):
            raise KeyFileError("CURVE needs both your key (--curve-key / NSD_CURVE_KEY) and the broker's public "
                               "key (--server-key / NSD_SERVER_KEY)")
        self._curve = ClientKeys.load(Path(curve_key), Path(server_key)) if curve_key else None
        self.timeout_s = timeout_s
        self.reconnect_s = reconnect_s  # how long an event stream waits out a broker that went away
        self.idle_resnapshot_s = idle_resnapshot_s
        self._own_ctx = ctx is None  # a shared context (the gateway's connections) is its owner's to end
        self.ctx = zmq.asyncio.Context() if ctx is None else ctx
        self._sock: zmq.asyncio.Socket | None = None
        self._sock_at = ""  # the broker that socket is connected to
        self._watch: HandshakeWatch | None = None  # the request socket's handshakes and disconnects
        self._req = itertools.count(1)
        self._lock = asyncio.Lock()
        self._events_endpoints: dict[str, str] = {}  # broker -> its events endpoint (HELLO)
        self.uploaded_bytes = 0  # blob bytes this client actually sent (dedup shows as 0)

    async def close(self) -> None:
        self._drop_socket()
        if self._own_ctx:
            self.ctx.term()

    def _open_socket(self) -> None:
        self._sock = configure(self.ctx.socket(zmq.DEALER))
        if self._curve is not None:
            self._curve.apply(self._sock)
        self._watch = HandshakeWatch(self._sock, "client", also=zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.broker)

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._watch.close()
            self._sock.close(linger=0)
            self._sock = self._watch = None

    def _disconnects(self) -> int:
        """Disconnect events seen since the last call; a refused handshake raises BrokerRefused (no answer
        will come on this socket: the next request tries a fresh one)."""
        count = self._watch.take()
        if self._watch.last is not None:
            refused = self._watch.last
            self._drop_socket()
            raise BrokerRefused(f"{refused} (broker at {self.broker})")
        return count

    @property
    def broker(self) -> str:
        """The broker this client talks to now (one of a pair's two after a failover)."""
        return self.endpoints.current

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def request(self, cmd: Cmd, **body: Any) -> dict[str, Any]:
        body = {**self._acting_fields(cmd), **body}  # the tenant a gateway acts for (Privacy.acting_for)
        async with self._lock:
            if not self.endpoints.pair:
                return await self._request(cmd, body)
            if cmd is Cmd.SUBMIT:  # the same id on every attempt: a broker that got it already answers the same task
                body.setdefault("submit_id", uuid.uuid4().hex)
            for attempt in range(3 * len(self.endpoints.all)):
                try:
                    reply = await self._request(cmd, {**body, **self.endpoints.extra()})
                except NotActive:
                    self.endpoints.refused()
                    await asyncio.sleep(min(1.0, 0.1 * attempt))
                except BrokerUnavailable:
                    self.endpoints.silent()
                else:
                    self.endpoints.answered()
                    return reply
            raise BrokerUnavailable(f"no broker of the pair {self.endpoints} answered {cmd.name} (is one of them "
                                    f"running and serving?)")

    async def _request(self, cmd: Cmd, body: dict[str, Any]) -> dict[str, Any]:
        """One request to the current broker (Lazy Pirate: a socket that timed out is dropped)."""
        if self._sock is not None and self._sock_at != self.broker:  # another client sharing our endpoints moved
            self._drop_socket()
        if self._sock is None:
            self._open_socket()
            self._sock_at = self.broker
        self._disconnects()  # earlier ones (a broker restart between requests) are not this request's
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            return await self._exchange(cmd, body, deadline)
        except _Disconnected:
            # ZeroMQ closes a connection for good on a message over MAXMSGSIZE (a broker that died
            # also disconnects). If the broker answers a HELLO on a fresh connection, it was the size.
            self._drop_socket()
            self._open_socket()
            try:
                await self._exchange(Cmd.HELLO, {}, deadline)
            except BrokerRefused:
                raise
            except (_Disconnected, BrokerUnavailable):
                pass
            else:
                raise ReplyTooLarge(
                    f"the broker's answer to {cmd.name} was larger than this client's limit of "
                    f"{MAX_MESSAGE_BYTES // 2**20} MiB per message, so it was dropped; ask for less") from None
            self._drop_socket()
            raise BrokerUnavailable(f"lost the connection to the nsd broker at {self.broker} while waiting "
                                    f"for its answer to {cmd.name}") from None

    async def _exchange(self, cmd: Cmd, body: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Send one request and wait for its reply until `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        req = next(self._req)
        frames = pack(cmd, {"req": req, **body})
        if len(frames[-1]) > MAX_BODY[cmd]:  # the broker would refuse it at the door: say why here
            what = "task spec" if cmd is Cmd.SUBMIT else f"{cmd.name} request"
            raise BrokerError(f"the {what} is too large: {len(frames[-1])} bytes packed, the broker accepts "
                              f"at most {MAX_BODY[cmd]}")
        await self._sock.send_multipart(frames)
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._watch.monitor, zmq.POLLIN)
        while True:
            remaining = deadline - loop.time()
            ready = dict(await poller.poll(timeout=int(remaining * 1000))) if remaining > 0 else {}
            if not ready:
                self._disconnects()  # a refused handshake says so, rather than "no answer"
                self._drop_socket()  # Lazy Pirate: a stale request must not answer the next one
                raise BrokerUnavailable(f"no answer from the nsd broker at {self.broker} within "
                                        f"{self.timeout_s:g}s (is `nsd broker` running? set --broker or "
                                        f"NSD_BROKER)")
            if self._sock not in ready:
                if self._disconnects():
                    raise _Disconnected()
                continue
            try:
                msg = unpack(await self._sock.recv_multipart(), BROKER_TO_CLIENT)
            except ProtocolError:
                continue
            if msg.body["req"] != req:
                continue  # a late answer to an earlier request
            self.endpoints.heard(msg.body)
            if msg.cmd is Cmd.ERROR:
                if msg.body.get("not_active"):
                    self._drop_socket()
                    raise NotActive(msg.body["error"])
                raise BrokerError(msg.body["error"])
            return msg.body

    async def hello(self) -> dict[str, Any]:
        return await self.request(Cmd.HELLO)

    async def submit(self, spec: dict | TaskSpec | str | os.PathLike) -> str:
        """Validate, upload the files it names (unless model.shared), submit; returns the task id."""
        raw = prepare_spec(spec)
        if not raw["model"]["shared"]:
            for section, key in PATH_FIELDS:
                if raw[section][key] and not parse_ref(raw[section][key]):
                    raw[section][key] = await self.upload(raw[section][key])
        return (await self.request(Cmd.SUBMIT, spec=raw))["task_id"]

    async def status(self, task_id: str, offset: int | None = None, limit: int | None = None) -> dict[str, Any]:
        """The task's view. Its trials come in pages (README "Bounded views"): without `offset`/`limit`, every
        page is read (each reply bounded) and the view holds them all; with them, that one page (and its
        `trials_page`)."""
        return await self._paged(Cmd.STATUS, task_id, offset, limit)

    async def _paged(self, cmd: Cmd, task_id: str, offset: int | None, limit: int | None) -> dict[str, Any]:
        if offset is not None or limit is not None:
            page = {k: v for k, v in (("offset", offset), ("limit", limit)) if v is not None}
            return (await self.request(cmd, task_id=task_id, **page))["task"]
        task = (await self.request(cmd, task_id=task_id))["task"]
        page = task.get("trials_page")
        if page is None:  # a broker from before paging: every trial, in one reply
            return task
        trials = list(task["trials"])
        while len(trials) < page["total"]:
            more = (await self.request(cmd, task_id=task["task_id"], offset=len(trials), limit=page["limit"]))["task"]
            if not more["trials"]:
                break  # the task was deleted meanwhile: what we have
            trials += more["trials"]
            page = {**more["trials_page"], "limit": page["limit"]}
        task["trials"] = trials
        del task["trials_page"]  # the whole view: every trial (as the gateway's views are)
        return task

    async def list(self) -> list[dict[str, Any]]:
        return (await self.request(Cmd.LIST))["tasks"]

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return (await self.request(Cmd.CANCEL_TASK, task_id=task_id))["task"]

    async def cluster(self) -> list[dict[str, Any]]:
        return (await self.request(Cmd.CLUSTER))["workers"]

    async def cluster_status(self) -> dict[str, Any]:
        """{"workers": [...], "pair": {...} or None} (pair: which broker serves, how far behind the other is)."""
        reply = await self.request(Cmd.CLUSTER)
        return {"workers": reply["workers"], "pair": reply.get("pair")}

    async def logs(self, task_id: str, job: int | str | None = None) -> list[dict[str, Any]]:
        """Each job's log (last 64 KiB): [{job, attempt, worker, text}]; job = a trial index, "plan", "baseline",
        "refine/<index>" or "save".
        A whole task's logs can exceed one message: the broker then cuts the oldest (`cut: true`), and
        those are asked for job by job."""
        if job is not None:
            return (await self.request(Cmd.LOGS, task_id=task_id, job=str(job)))["logs"]
        try:
            logs = (await self.request(Cmd.LOGS, task_id=task_id))["logs"]
        except ReplyTooLarge:  # an older broker that does not cut: ask for every job
            task = await self.status(task_id)
            logs = [{"job": name, "cut": True} for name in ["plan", *(str(t["index"]) for t in task["trials"]), "save"]]
            task_id = task["task_id"]
        out = []
        for entry in logs:
            if entry.get("cut"):
                whole = (await self.request(Cmd.LOGS, task_id=task_id, job=str(entry["job"])))["logs"]
                out += [e for e in whole if e.get("attempt") == entry.get("attempt", e.get("attempt"))]
            else:
                out.append(entry)
        return out

    async def result(self, task_id: str, wait: bool = False, offset: int | None = None,
                     limit: int | None = None) -> dict[str, Any]:
        """The task's full result (every trial, page by page; or one page: `offset`, `limit`); with
        wait=True, once the task has ended."""
        if wait:
            async for _ in self.events(task_id):
                pass
        return await self._paged(Cmd.RESULT_GET, task_id, offset, limit)
