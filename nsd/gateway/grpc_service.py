"""The gRPC door (nsd.proto): the same operations as REST, with gRPC status codes for the same errors.

No browser reaches it (a page cannot speak gRPC's HTTP/2 with trailers), so the REST door's browser
guard has nothing to guard here; the token is the caller, as on REST.

The door's bounds (the HTTP door's, nsd.gateway.door, in gRPC's terms): a connection must finish its
handshake within `header_timeout_s` and is closed after `grpc_idle_s` without a call (a client's channel
reconnects by itself), one connection carries at most MAX_STREAMS calls at once, and one address (an IPv6
/64) at most `max_connections_per_client` calls over all its connections: past it a call is refused
(RESOURCE_EXHAUSTED) before its token is looked at."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from typing import Any, AsyncIterator

import grpc

from nsd import __version__
from nsd.client.errors import BrokerError
from nsd.gateway import nsd_pb2 as pb
from nsd.gateway import nsd_pb2_grpc as pb_grpc
from nsd.gateway.auth import Caller, Tokens
from nsd.gateway.broker import PAGE
from nsd.gateway.door import DoorLimits, client_key
from nsd.gateway.fanout import TooManyStreams, event_json
from nsd.gateway.service import BadRequest, Forbidden, Gateway, Invalid, NoArtifact, NotFound, Unavailable
from nsd.gateway.streams import tar_entries, tar_stream
from nsd.gateway.uploads import BadUpload, UploadTooLarge

MAX_STREAMS = 100  # calls at once on one HTTP/2 connection (grpc.max_concurrent_streams)

CODES = {  # the gateway's errors, as REST answers them with 422 / 404 / 400 / 403 / 413 / 400 / 409 / 429 / 503
    Invalid: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    UploadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BadUpload: grpc.StatusCode.INVALID_ARGUMENT,
    NoArtifact: grpc.StatusCode.FAILED_PRECONDITION,
    TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    BrokerError: grpc.StatusCode.INVALID_ARGUMENT,
}


def _details(exc: Exception) -> str:
    return "\n".join(exc.problems) if isinstance(exc, Invalid) else str(exc)


def rpc(method):
    """Run the method inside `NsdServicer._call` (the address's cap, the caller by its token, a gateway
    error as its status code). Works for unary and streaming answers alike (an async generator method is
    wrapped as one)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            async with self._call(context) as caller:
                async for item in method(self, request, context, caller):
                    yield item
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        async with self._call(context) as caller:
            return await method(self, request, context, caller)
    return unary


def peer_address(peer: str) -> str:
    """The host of grpc's peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"); other kinds as they are."""
    kind, _, rest = peer.partition(":")
    return rest.rpartition(":")[0].strip("[]") if kind in ("ipv4", "ipv6") else peer


def _task(view: dict[str, Any]) -> pb.Task:
    return pb.Task(task_id=view["task_id"], state=view["state"], seq=view.get("seq") or 0,
                   json=json.dumps(view, sort_keys=True))


class NsdServicer(pb_grpc.NsdServicer):
    def __init__(self, gateway: Gateway, tokens: Tokens, per_client: int):
        self.gateway, self.tokens = gateway, tokens
        self.calls = DoorLimits(per_client=per_client)  # calls open per client address

    @contextlib.asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext) -> AsyncIterator[Caller]:
        """One call: admitted under its address's cap (before its token is looked at), its caller found by
        the token, a gateway error raised inside turned into its status code; the address's count is
        given back however the call ends."""
        key = client_key(peer_address(context.peer() or ""))
        if not self.calls.admit(key):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this address has {self.calls.per_client} calls open, the most it may; "
                                "end one first")
        try:
            caller = self._caller(context)
            if caller is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
            try:
                yield caller
            except tuple(CODES) as exc:
                await context.abort(CODES[type(exc)], _details(exc))
        finally:
            self.calls.release(key)

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller | None:
        metadata = dict(context.invocation_metadata() or ())
        return self.tokens.who(metadata.get("authorization"))

    @rpc
    async def Ping(self, request, context, caller):
        await self.gateway.ping()
        return pb.PingReply(gateway_version=__version__, broker=self.gateway.client.broker)

    @rpc
    async def Submit(self, request, context, caller):
        try:
            raw = json.loads(request.spec_json)
        except ValueError as exc:
            raise Invalid([f"spec_json is not JSON: {exc}"]) from None
        return pb.SubmitReply(task_id=await self.gateway.submit(caller, raw))

    @rpc
    async def Get(self, request, context, caller):
        offset = request.offset if request.HasField("offset") else 0
        limit = request.limit if request.HasField("limit") else PAGE
        return _task(await self.gateway.get(caller, request.task_id, offset, limit))

    @rpc
    async def List(self, request, context, caller):
        return pb.TaskList(tasks=[_task(t) for t in await self.gateway.list(caller)])

    @rpc
    async def Cancel(self, request, context, caller):
        return _task(await self.gateway.cancel(caller, request.task_id))

    @rpc
    async def Delete(self, request, context, caller):
        answer = await self.gateway.delete(caller, request.task_id)
        view = answer.get("task", answer)
        return pb.Task(task_id=str(view.get("task_id", request.task_id)), state=str(view.get("state", "deleted")),
                       json=json.dumps(answer, sort_keys=True))

    @rpc
    async def Watch(self, request, context, caller):
        after = request.after_seq if request.HasField("after_seq") else None
        events = await self.gateway.watch(caller, request.task_id, after)  # NOT_FOUND before the stream starts
        try:
            async for event in events:
                yield pb.Event(seq=event["seq"], kind=event["kind"], task_id=event["task_id"], json=event_json(event))
        finally:
            await events.aclose()

    @rpc
    async def Logs(self, request, context, caller):
        logs = await self.gateway.logs(caller, request.task_id, request.trial or None)
        return pb.LogsReply(logs=[pb.LogEntry(job=str(e["job"]), attempt=int(e.get("attempt") or 0),
                                              worker=str(e.get("worker") or ""), text=e["text"]) for e in logs])

    @rpc
    async def Fetch(self, request, context, caller):
        async with self.gateway.fetched(caller, request.task_id) as (task, folder):
            size, chunks = tar_stream(tar_entries(folder))
            first = True
            for chunk in chunks:
                yield pb.Chunk(data=chunk, name=f"{task['task_id']}.tar" if first else "", size=size if first else 0)
                first = False

    @rpc
    async def Upload(self, request_iterator, context, caller):
        parts = request_iterator.__aiter__()
        try:
            first = await parts.__anext__()
        except StopAsyncIteration:
            raise BadUpload("an upload starts with a header (name)") from None
        if first.WhichOneof("part") != "header":
            raise BadUpload("an upload starts with a header (name), then data chunks")
        header = first.header

        async def chunks() -> AsyncIterator[bytes]:
            async for part in parts:
                if part.WhichOneof("part") != "data":
                    raise BadUpload("only one header per upload")
                yield part.data

        ref = await self.gateway.upload(caller, chunks(), header.name, header.tar, header.sha256 or None)
        return pb.UploadReply(ref=ref)

    @rpc
    async def Cluster(self, request, context, caller):
        return pb.ClusterReply(workers_json=json.dumps(await self.gateway.cluster(caller), sort_keys=True))


def add_to_server(server: grpc.aio.Server, gateway: Gateway, tokens: Tokens, per_client: int) -> NsdServicer:
    servicer = NsdServicer(gateway, tokens, per_client)
    pb_grpc.add_NsdServicer_to_server(servicer, server)
    return servicer
