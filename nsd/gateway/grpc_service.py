"""The gRPC door (nsd.proto): the same operations as REST, with gRPC status codes for the same errors."""

from __future__ import annotations

import functools
import json
from typing import Any, AsyncIterator

import grpc

from nsd import __version__
from nsd.client.api import BrokerError
from nsd.gateway import nsd_pb2 as pb
from nsd.gateway import nsd_pb2_grpc as pb_grpc
from nsd.gateway.auth import Tokens
from nsd.gateway.service import Gateway, Invalid, NoArtifact, NotFound, Unavailable, file_chunks
from nsd.gateway.uploads import BadUpload, UploadTooLarge

CODES = {  # the gateway's errors, as REST answers them with 422 / 404 / 413 / 400 / 409 / 503 / 400
    Invalid: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    UploadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BadUpload: grpc.StatusCode.INVALID_ARGUMENT,
    NoArtifact: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    BrokerError: grpc.StatusCode.INVALID_ARGUMENT,
}


def _details(exc: Exception) -> str:
    return "\n".join(exc.problems) if isinstance(exc, Invalid) else str(exc)


def rpc(method):
    """Check the token, then run; a gateway error becomes its status code. Works for unary and streaming
    answers alike (an async generator method is wrapped as one)."""
    import inspect

    async def refuse_or_abort(self, context, exc: Exception | None) -> None:
        if exc is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        await context.abort(CODES[type(exc)], _details(exc))

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            if not self._allowed(context):
                await refuse_or_abort(self, context, None)
            try:
                async for item in method(self, request, context):
                    yield item
            except tuple(CODES) as exc:
                await refuse_or_abort(self, context, exc)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        if not self._allowed(context):
            await refuse_or_abort(self, context, None)
        try:
            return await method(self, request, context)
        except tuple(CODES) as exc:
            await refuse_or_abort(self, context, exc)
    return unary


def _task(view: dict[str, Any]) -> pb.Task:
    return pb.Task(task_id=view["task_id"], state=view["state"], seq=view.get("seq") or 0,
                   json=json.dumps(view, sort_keys=True))


class NsdServicer(pb_grpc.NsdServicer):
    def __init__(self, gateway: Gateway, tokens: Tokens):
        self.gateway, self.tokens = gateway, tokens

    def _allowed(self, context: grpc.aio.ServicerContext) -> bool:
        metadata = dict(context.invocation_metadata() or ())
        return self.tokens.who(metadata.get("authorization")) is not None

    @rpc
    async def Ping(self, request, context):
        await self.gateway.ping()
        return pb.PingReply(gateway_version=__version__, broker=self.gateway.client.broker)

    @rpc
    async def Submit(self, request, context):
        try:
            raw = json.loads(request.spec_json)
        except ValueError as exc:
            raise Invalid([f"spec_json is not JSON: {exc}"]) from None
        return pb.SubmitReply(task_id=await self.gateway.submit(raw))

    @rpc
    async def Get(self, request, context):
        return _task(await self.gateway.get(request.task_id))

    @rpc
    async def List(self, request, context):
        return pb.TaskList(tasks=[_task(t) for t in await self.gateway.list()])

    @rpc
    async def Cancel(self, request, context):
        return _task(await self.gateway.cancel(request.task_id))

    @rpc
    async def Watch(self, request, context):
        after = request.after_seq if request.HasField("after_seq") else None
        await self.gateway.get(request.task_id)  # NOT_FOUND before the stream starts
        async for event in self.gateway.events(request.task_id, after):
            yield pb.Event(seq=event["seq"], kind=event["kind"], task_id=event["task_id"],
                           json=json.dumps(event, sort_keys=True))

    @rpc
    async def Logs(self, request, context):
        logs = await self.gateway.logs(request.task_id, request.trial or None)
        return pb.LogsReply(logs=[pb.LogEntry(job=str(e["job"]), attempt=int(e.get("attempt") or 0),
                                              worker=str(e.get("worker") or ""), text=e["text"]) for e in logs])

    @rpc
    async def Fetch(self, request, context):
        async with self.gateway.artifact(request.task_id) as (task, name, path):
            size = path.stat().st_size
            first = True
            for chunk in file_chunks(path):
                yield pb.Chunk(data=chunk, name=name if first else "", size=size if first else 0)
                first = False

    @rpc
    async def Upload(self, request_iterator, context):
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

        ref = await self.gateway.upload(chunks(), header.name, header.tar, header.sha256 or None)
        return pb.UploadReply(ref=ref)

    @rpc
    async def Cluster(self, request, context):
        return pb.ClusterReply(workers_json=json.dumps(await self.gateway.cluster(), sort_keys=True))


def add_to_server(server: grpc.aio.Server, gateway: Gateway, tokens: Tokens) -> None:
    pb_grpc.add_NsdServicer_to_server(NsdServicer(gateway, tokens), server)
