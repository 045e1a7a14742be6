"""Client API: requests to the broker's client socket and the task event stream.

Requests are Lazy Pirate style: one DEALER, a request id per call, a timeout after which the socket is
dropped and `BrokerUnavailable` raised. Events follow the zguide's Clone pattern: subscribe first, then
take a snapshot with its `seq`, drop older events, and take a new snapshot on a gap or a quiet spell —
so an `events()` stream never misses a change, however the subscription and snapshot race.

Long module: the async client and its sync twin share one surface (requests, uploads, fetch, events);
the twin is a line per method.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import os
import tempfile
import tomllib
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import zmq
import zmq.asyncio

from nsd.blobs import CHUNK_BYTES, make_ref, parse_ref, unpack_tree
from nsd.net import configure, connectable
from nsd.protocol import BROKER_TO_CLIENT, MAX_BODY, MAX_MESSAGE_BYTES, Cmd, ProtocolError, pack, unpack
from nsd.security import ClientKeys, KeyFileError
from nsd.spec import PATH_FIELDS, PT2E_CONFIGS, TaskSpec, validate
from nsd.states import TaskState
from nsd.transfer import Packed, packed, receive_chunks, send_chunks

DEFAULT_BROKER = "tcp://127.0.0.1:5550"
# The tenant requests act for (a gateway's client: `AsyncClient.acting_for`), per asyncio task / thread.
_ACTING: contextvars.ContextVar[tuple[Any, dict] | None] = contextvars.ContextVar("nsd_acting_for", default=None)


class _Disconnected(Exception):
    """The request socket's connection closed while a reply was awaited."""


class BrokerUnavailable(ConnectionError):
    """No answer from the broker in time."""


class BrokerError(RuntimeError):
    """The broker answered with an error (bad spec, unknown task, ...)."""


class ReplyTooLarge(BrokerError):
    """The broker answered, but with a message over this client's MAXMSGSIZE: ZeroMQ drops such a
    message and closes the connection, so without this the request would end as BrokerUnavailable."""


def broker_address(address: str | None = None) -> str:
    return address or os.environ.get("NSD_BROKER") or DEFAULT_BROKER


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML or JSON spec file; relative paths in it are taken from the spec's folder."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path} is not valid {'JSON' if file.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a task spec is a table (a JSON object), not {type(raw).__name__}")
    raw.setdefault("name", file.stem)
    base = file.resolve().parent
    for section, key in PATH_FIELDS:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not os.path.isabs(value):
            raw[section][key] = str((base / value).resolve())
    return raw


def prepare_spec(spec: dict | TaskSpec | str | os.PathLike) -> dict[str, Any]:
    """Validate here, before anything is sent, and check that the files it names exist."""
    if isinstance(spec, (str, os.PathLike)):
        spec = read_spec(spec)
    task = spec if isinstance(spec, TaskSpec) else validate(spec, local_paths=True)  # uploaded after this
    missing = []
    for section, key in PATH_FIELDS:
        where, path = f"{section}.{key}", getattr(getattr(task, section), key)
        if path and not parse_ref(path) and not os.path.exists(path):
            hub = where == "model.path" and not os.path.isabs(path) and path.count("/") <= 1
            missing.append(f"{where}: {path} does not exist" + (
                " (nsd loads models from local folders only; it never downloads from a model hub)" if hub else ""))
    if missing:
        raise FileNotFoundError("invalid task spec:\n" + "\n".join(f"  - {m}" for m in missing))
    return task.to_dict()


class AsyncClient:
    def __init__(self, broker: str | None = None, timeout_s: float = 10.0, idle_resnapshot_s: float = 2.0,
                 reconnect_s: float = 300.0, curve_key: str | os.PathLike | None = None,
                 server_key: str | os.PathLike | None = None):
        self.broker = broker_address(broker)
        if bool(curve_key) != bool(server_key):
            raise KeyFileError("CURVE needs both your key (--curve-key / NSD_CURVE_KEY) and the broker's public "
                               "key (--server-key / NSD_SERVER_KEY)")
        self._curve = ClientKeys.load(Path(curve_key), Path(server_key)) if curve_key else None
        self.timeout_s = timeout_s
        self.reconnect_s = reconnect_s  # how long an event stream waits out a broker that went away
        self.idle_resnapshot_s = idle_resnapshot_s
        self.ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None  # the request socket's disconnect events
        self._req = itertools.count(1)
        self._lock = asyncio.Lock()
        self._events_endpoint: str | None = None
        self.uploaded_bytes = 0  # blob bytes this client actually sent (dedup shows as 0)

    async def close(self) -> None:
        self._drop_socket()
        self.ctx.term()

    def _open_socket(self) -> None:
        self._sock = configure(self.ctx.socket(zmq.DEALER))
        if self._curve is not None:
            self._curve.apply(self._sock)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.broker)

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._sock = self._monitor = None

    def _disconnects(self) -> int:
        """Disconnect events seen since the last call."""
        events, count = zmq.Socket.shadow(self._monitor.underlying), 0  # plain, non-blocking reads
        while True:
            try:
                events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return count
            count += 1

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @contextlib.contextmanager
    def acting_for(self, tenant: str, code: bool = False):
        """Within this block (this asyncio task, or this thread for `Client`), requests act for `tenant`,
        and a submit carries the right to run a python recipe when `code`. The broker honours it only from a
        key allowed with `nsd keys allow --role gateway` (README "Privacy"); any other key is refused."""
        token = _ACTING.set((self, {"tenant": tenant, "code": bool(code)}))
        try:
            yield self
        finally:
            _ACTING.reset(token)

    def _acting_fields(self, cmd: Cmd) -> dict[str, Any]:
        acting = _ACTING.get()
        if acting is None or acting[0] is not self:
            return {}
        fields = acting[1]
        return {"tenant": fields["tenant"], **({"code": True} if cmd is Cmd.SUBMIT and fields["code"] else {})}

    async def request(self, cmd: Cmd, **body: Any) -> dict[str, Any]:
        body = {**self._acting_fields(cmd), **body}
        async with self._lock:
            if self._sock is None:
                self._open_socket()
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
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            remaining = deadline - loop.time()
            ready = dict(await poller.poll(timeout=int(remaining * 1000))) if remaining > 0 else {}
            if not ready:
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
            if msg.cmd is Cmd.ERROR:
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

    async def upload(self, path: str | os.PathLike) -> str:
        """Pack a file or folder into a blob and upload what the broker lacks; returns its reference."""
        path = Path(path)
        with packed(path) as blob:
            if (await self.request(Cmd.BLOB_HAVE, sha256=[blob.sha256]))["missing"]:
                await send_chunks(blob.file, partial(self._put, blob))
        return make_ref(blob.sha256, path.name)

    async def _put(self, blob: Packed, offset: int, data: bytes) -> dict[str, Any]:
        reply = await self.request(Cmd.BLOB_PUT, sha256=blob.sha256, offset=offset, size=blob.size, data=data)
        self.uploaded_bytes += len(data)
        return reply

    async def download(self, sha: str, dest: Path) -> None:
        """A stored blob, chunk by chunk, into a file; its hash is checked."""
        async def get(offset: int) -> dict[str, Any]:
            return await self.request(Cmd.BLOB_GET, sha256=sha, offset=offset, length=CHUNK_BYTES)

        with open(dest, "wb") as out:
            try:
                await receive_chunks(out, sha, get)
            except ValueError as exc:
                raise BrokerError(str(exc)) from None

    async def fetch(self, task_id: str, out_dir: str | os.PathLike) -> Path:
        """Write the task's quantized model to out_dir/model, with result.json and a README on loading it."""
        task = await self.result(task_id)
        ref = parse_ref(task.get("artifact"))
        if ref is None:
            why = task["error"] or f"the task is {task['state']}"
            raise BrokerError(f"task {task['task_id']} has no quantized model to fetch ({why})")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / ref[1]
        if target.exists():
            raise FileExistsError(f"{target} already exists; choose another --output folder")
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            await self.download(ref[0], Path(tmp) / "blob.tar")
            unpack_tree(Path(tmp) / "blob.tar", Path(tmp) / "tree")
            os.replace(Path(tmp) / "tree" / ref[1], target)
        (out / "result.json").write_text(json.dumps(task, indent=2, sort_keys=True))
        (out / "README.md").write_text(loading_readme(task, ref[1]))
        return target

    async def status(self, task_id: str, offset: int | None = None, limit: int | None = None) -> dict[str, Any]:
        """The task's view. Its trials come in pages (README "Bounded views"): without `offset`/`limit`, every
        page is read (each reply bounded) and the view holds them all; with them, that one page."""
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
                break  # the task was deleted meanwhile, or lost trials (it cannot): what we have
            trials += more["trials"]
            page = {**more["trials_page"], "limit": page["limit"]}
        task["trials"] = trials
        task["trials_page"] = {"offset": 0, "limit": len(trials), "total": len(trials)}
        return task

    async def delete(self, task_id: str) -> dict[str, Any]:
        """Erase the task and what is kept about it on the broker and its workers (README "Privacy");
        a running task is cancelled first. Answers {task_id, blobs_dropped}."""
        return await self.request(Cmd.DELETE_TASK, task_id=task_id)

    async def audit(self, task_id: str | None = None, owner: str | None = None, limit: int = 100,
                    before: int | None = None) -> list[dict[str, Any]]:
        """The audit log, newest first (admin keys): [{id, ts, tenant, actor, action, task_id, detail}]."""
        filters = {k: v for k, v in (("task_id", task_id), ("owner", owner), ("before", before)) if v is not None}
        return (await self.request(Cmd.AUDIT, limit=limit, **filters))["entries"]

    async def cache_purge(self, task_id: str | None = None, worker: str | None = None, all: bool = False) -> int:
        """Drop metric cache entries: one task's, one worker's (admins), or all (an admin: the whole cache;
        anyone else: their tenant's). Returns how many went."""
        which = {k: v for k, v in (("task_id", task_id), ("worker", worker), ("all", all or None)) if v is not None}
        return (await self.request(Cmd.CACHE_PURGE, **which))["purged"]

    async def whoami(self) -> dict[str, Any]:
        """How the broker sees this connection: {role, name, tenant, code} (README "Privacy")."""
        return (await self.hello()).get("you", {"role": "dev", "name": "", "tenant": "", "code": True})

    async def list(self) -> list[dict[str, Any]]:
        return (await self.request(Cmd.LIST))["tasks"]

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return (await self.request(Cmd.CANCEL_TASK, task_id=task_id))["task"]

    async def cluster(self) -> list[dict[str, Any]]:
        return (await self.request(Cmd.CLUSTER))["workers"]

    async def logs(self, task_id: str, job: int | str | None = None) -> list[dict[str, Any]]:
        """Each job's log (last 64 KiB): [{job, attempt, worker, text}]; job = a trial index, "plan" or "save".
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

    async def events(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        """A snapshot event (`kind == "snapshot"`, with the whole task), then every later event in seq
        order; a new snapshot whenever events were missed. Ends after the task's final state."""
        if self._events_endpoint is None:
            self._events_endpoint = connectable((await self.hello())["events"], _host(self.broker))
        task_id = (await self.status(task_id))["task_id"]  # a unique prefix becomes the full id
        sub = configure(self.ctx.socket(zmq.SUB))
        try:
            if self._curve is not None:
                self._curve.apply(sub)
            sub.connect(self._events_endpoint)
            sub.subscribe(task_id.encode())
            snapshot = await self.status(task_id)
            seq = snapshot["seq"]
            yield {"kind": "snapshot", "task_id": task_id, "seq": seq, "task": snapshot}
            if TaskState(snapshot["state"]).terminal:
                return
            while True:
                if await sub.poll(timeout=int(self.idle_resnapshot_s * 1000)):
                    frames = await sub.recv_multipart()
                    try:
                        event = unpack(frames[1:], frozenset({Cmd.EVENT})).body
                    except ProtocolError:
                        continue
                    if frames[0] != task_id.encode() or event["seq"] <= seq:
                        continue
                    if event["seq"] == seq + 1:
                        seq = event["seq"]
                        yield event
                        if event["kind"] == "state" and TaskState(event["state"]).terminal:
                            return
                        continue
                # A gap, or a quiet spell that may hide a missed final event: take a new snapshot.
                snapshot = await self._status_patiently(task_id)
                if snapshot["seq"] > seq:
                    seq = snapshot["seq"]
                    yield {"kind": "snapshot", "task_id": task_id, "seq": seq, "task": snapshot}
                if TaskState(snapshot["state"]).terminal:
                    return
        finally:
            sub.close(linger=0)


    async def _status_patiently(self, task_id: str) -> dict[str, Any]:
        """STATUS, riding out a broker restart for up to `reconnect_s` (the SUB socket reconnects by itself)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.reconnect_s
        while True:
            try:
                return await self.status(task_id)
            except BrokerUnavailable:
                if loop.time() > give_up:
                    raise
                await asyncio.sleep(min(1.0, self.idle_resnapshot_s))


def _host(address: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(address).hostname if address.startswith("tcp://") else None


def loading_readme(task: dict, name: str) -> str:
    winner = task["winner"]
    (config_name, _), = winner["config"].items()
    weight_only = config_name not in PT2E_CONFIGS
    load = ("from neural_compressor.torch.quantization import load\n"
            "fp32_model = ...  # the same FP32 model the task tuned (your recipe's load_model())\n"
            f"model = load('{name}', original_model=fp32_model)" if weight_only else
            "from neural_compressor.torch.quantization import load\n"
            f"model = load('{name}')  # a PT2E graph; for int8 speed, torch.compile it with "
            "torch._inductor.config.freezing = True")
    ops = winner.get("fallback") or []
    fallback = (f"The fallback search ({winner.get('stage')} stage) kept these {len(ops)} ops in FP32; they are "
                f"plain float modules in the saved model:\n\n" + "".join(f"- `{op}`\n" for op in ops) + "\n"
                if ops else "")
    return (f"# {task['name']}: quantized by nsd\n\n"
            f"Task `{task['task_id']}` ran {len(task['trials'])} trials; trial {winner['index']} won "
            f"(`{winner['label']}`, metric {winner['metric']:.6g} against an FP32 baseline of "
            f"{task['baseline']:.6g}; goal met: {str(task['met_goal']).lower()}).\n\n"
            f"{fallback}`{name}/` was written by INC's `save` (with `nsd.json` describing the trial); "
            f"`result.json` is the whole task result.\n\n"
            f"Load it (needs `pip install neural-compressor-pt==3.10 torch==2.13.0`):\n\n"
            f"```python\n{load}\n```\n")


class Client:
    """The blocking client: the same calls as AsyncClient, on a private event loop.

    Not for use inside a running event loop (use AsyncClient there)."""

    def __init__(self, broker: str | None = None, timeout_s: float = 10.0,
                 curve_key: str | os.PathLike | None = None, server_key: str | os.PathLike | None = None):
        self._loop = asyncio.new_event_loop()
        try:
            self._async = self._loop.run_until_complete(self._make(broker, timeout_s, curve_key, server_key))
        except BaseException:
            self._loop.close()
            raise

    @staticmethod
    async def _make(broker: str | None, timeout_s: float, curve_key, server_key) -> AsyncClient:
        return AsyncClient(broker, timeout_s, curve_key=curve_key, server_key=server_key)

    @property
    def broker(self) -> str:
        return self._async.broker

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._async.close())
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, spec: dict | TaskSpec | str | os.PathLike) -> str:
        return self._run(self._async.submit(spec))

    def status(self, task_id: str, offset: int | None = None, limit: int | None = None) -> dict[str, Any]:
        return self._run(self._async.status(task_id, offset, limit))

    def delete(self, task_id: str) -> dict[str, Any]:
        return self._run(self._async.delete(task_id))

    def audit(self, task_id: str | None = None, owner: str | None = None, limit: int = 100,
              before: int | None = None) -> list[dict[str, Any]]:
        return self._run(self._async.audit(task_id, owner, limit, before))

    def cache_purge(self, task_id: str | None = None, worker: str | None = None, all: bool = False) -> int:
        return self._run(self._async.cache_purge(task_id, worker, all))

    def whoami(self) -> dict[str, Any]:
        return self._run(self._async.whoami())

    def acting_for(self, tenant: str, code: bool = False):
        return self._async.acting_for(tenant, code)

    def list(self) -> list[dict[str, Any]]:
        return self._run(self._async.list())

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._run(self._async.cancel(task_id))

    def cluster(self) -> list[dict[str, Any]]:
        return self._run(self._async.cluster())

    def logs(self, task_id: str, job: int | str | None = None) -> list[dict[str, Any]]:
        return self._run(self._async.logs(task_id, job))

    def result(self, task_id: str, wait: bool = False, offset: int | None = None,
               limit: int | None = None) -> dict[str, Any]:
        return self._run(self._async.result(task_id, wait=wait, offset=offset, limit=limit))

    def upload(self, path: str | os.PathLike) -> str:
        return self._run(self._async.upload(path))

    def fetch(self, task_id: str, out_dir: str | os.PathLike) -> Path:
        return self._run(self._async.fetch(task_id, out_dir))

    def events(self, task_id: str) -> Iterator[dict[str, Any]]:
        stream = self._async.events(task_id)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())
