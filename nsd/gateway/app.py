"""The REST door: JSON under /v1, Server-Sent Events for a task's stream, the web view at `/`.

OpenAPI is served at /openapi.json with interactive docs at /docs. Every /v1 route needs a bearer token
(unless the gateway runs with --no-auth, on loopback); /healthz, the docs and the static page do not (they
hold no data: the page asks for a token and sends it with each call, and /healthz without a token says
only ok or not). `BrowserGuard` (guard.py) stands in front of every route: Host, origin, content types,
security headers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
import fastapi_offline

from nsd import __version__
from nsd.client.errors import BrokerError
from nsd.gateway.auth import Caller, Tokens
from nsd.gateway.broker import PAGE
from nsd.gateway.fanout import TooManyStreams
from nsd.gateway.guard import BrowserGuard, media_type
from nsd.gateway.config import GatewayConfig, Limits
from nsd.gateway.service import BadRequest, Forbidden, Gateway, Invalid, NoArtifact, NotFound, Unavailable
from nsd.gateway.streams import sse_stream, stream_fetched
from nsd.gateway.uploads import BadUpload, UploadTooLarge

__all__ = ["Limits", "create_app"]
STATIC = Path(__file__).resolve().parent / "static"
# Swagger UI 5 (it reads OpenAPI 3.1, which FastAPI writes), from the fastapi-offline wheel, not a CDN.
SWAGGER_UI = Path(fastapi_offline.__file__).resolve().parent / "static"
TAR_TYPES = ("application/x-tar", "application/tar")
FILE_TYPES = ("application/octet-stream",)
BODY_IDLE_S = GatewayConfig.body_idle_s  # a body that sends nothing for this long is given up
DOCS = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nsd gateway — API</title>
<link rel="stylesheet" href="/swagger/swagger-ui.css"><link rel="icon" href="/swagger/favicon.png">
</head><body><div id="swagger-ui"></div>
<script src="/swagger/swagger-ui-bundle.js"></script><script src="/static/docs.js"></script>
</body></html>
"""


class Unauthorized(Exception):
    pass


class WrongMediaType(ValueError):
    pass


class StalledBody(TimeoutError):
    pass


async def paced(chunks: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """The body's chunks, given up (StalledBody) when none arrives for `idle_s`."""
    source = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(source.__anext__(), idle_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise StalledBody(f"the request body stalled: nothing arrived for {idle_s:g} s") from None
        yield chunk


async def read_body(request: Request, limit: int, idle_s: float = BODY_IDLE_S) -> bytes:
    """The request body, refused (413) as soon as it passes `limit`: a client cannot make us buffer more."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in paced(request.stream(), idle_s):
        body += chunk
        if len(body) > limit:
            raise UploadTooLarge(f"request body is over the limit of {limit} bytes")
    return bytes(body)


def create_app(gateway: Gateway, tokens: Tokens, limits: Limits = Limits(), keepalive_s: float = 15.0,
               hosts: frozenset[str] = frozenset({"127.0.0.1", "localhost", "::1"}),
               body_idle_s: float = BODY_IDLE_S) -> FastAPI:
    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN with an inline script; ours serves the
    # fastapi-offline package's copy and starts it from a file, so the docs work offline under our CSP.
    app = FastAPI(title="nsd gateway", version=__version__, docs_url=None,
                  description="Accuracy-aware INC quantization tuning as a service: REST door to the nsd broker.")
    app.add_middleware(BrowserGuard, hosts=hosts)

    def authorized(authorization: str | None = Header(default=None)) -> Caller:
        caller = tokens.who(authorization)
        if caller is None:
            raise Unauthorized()
        return caller

    _errors(app)
    v1 = APIRouter(prefix="/v1")

    @v1.post("/uploads", status_code=201, summary="Upload a file (raw body) or a folder (a tar of its contents)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                 "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
    async def post_upload(request: Request, name: str = Query(..., description="file or folder name in the ref"),
                          sha256: str | None = Query(None, description="the body's sha256, checked on arrival"),
                          caller: Caller = Depends(authorized)):
        kind = media_type(request.headers.get("content-type"))
        if kind not in TAR_TYPES + FILE_TYPES:
            raise WrongMediaType(f"an upload is application/octet-stream (a file) or application/x-tar (a tar "
                                 f"of a folder's contents), not {kind or 'without a Content-Type'!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_upload:
            raise UploadTooLarge(f"upload of {declared} bytes is over the limit of {limits.max_upload}")
        ref = await gateway.upload(caller, paced(request.stream(), body_idle_s), name, kind in TAR_TYPES, sha256)
        return {"ref": ref}

    @v1.post("/tasks", status_code=201, summary="Submit a task spec (JSON; file fields hold upload refs)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object", "description": "a task spec (README: Task spec)"}}}}})
    async def post_task(request: Request, caller: Caller = Depends(authorized)):
        if media_type(request.headers.get("content-type")) != "application/json":
            raise WrongMediaType("a task spec is sent as Content-Type: application/json")
        body = await read_body(request, limits.max_body, body_idle_s)
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise Invalid([f"body is not JSON: {exc}"]) from None
        return {"task_id": await gateway.submit(caller, raw)}

    @v1.get("/tasks", summary="The token's tasks, a summary each")
    async def list_tasks(caller: Caller = Depends(authorized)):
        return {"tasks": await gateway.list(caller)}

    @v1.get("/tasks/{task_id}", summary="One task's view (as `nsd result --json`), a page of its trials")
    async def get_task(task_id: str, caller: Caller = Depends(authorized),
                       offset: int = Query(0, ge=0, description="the first trial of the page"),
                       limit: int = Query(PAGE, ge=0, le=PAGE, description="trials in the page")):
        return await gateway.get(caller, task_id, offset, limit)

    @v1.post("/tasks/{task_id}/cancel", summary="Cancel a task")
    async def cancel_task(task_id: str, caller: Caller = Depends(authorized)):
        return await gateway.cancel(caller, task_id)

    @v1.delete("/tasks/{task_id}", summary="Delete a task: its model, logs, events and what only it uses")
    async def delete_task(task_id: str, caller: Caller = Depends(authorized)):
        return await gateway.delete(caller, task_id)

    @v1.get("/tasks/{task_id}/logs", summary="Each job's log (last 64 KiB), or one trial's")
    async def task_logs(task_id: str, caller: Caller = Depends(authorized),
                        trial: str | None = Query(None, description="a trial index, plan or save")):
        return {"logs": await gateway.logs(caller, task_id, trial)}

    @v1.get("/tasks/{task_id}/artifact", response_class=StreamingResponse,
            summary="The folder `nsd fetch` writes (model/, result.json, README.md) as a tar")
    async def task_artifact(task_id: str, caller: Caller = Depends(authorized)):
        return await stream_fetched(gateway.fetched(caller, task_id), "tar")

    @v1.get("/tasks/{task_id}/events", summary="Server-Sent Events: a snapshot, then every event",
            response_class=StreamingResponse)
    async def task_events(task_id: str, caller: Caller = Depends(authorized),
                          last_event_id: str | None = Header(default=None),
                          after: int | None = Query(None, description="resume after this seq (as Last-Event-ID)")):
        if last_event_id is not None:
            try:
                after = int(last_event_id)
            except ValueError:
                raise BadRequest(f"Last-Event-ID {last_event_id[:40]!r} is not an event id of this stream "
                                 "(the whole number in an event's `id:` line)") from None
        events = await gateway.watch(caller, task_id, after)  # an unknown id is a 404 now, not an empty stream
        return StreamingResponse(sse_stream(events, keepalive_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.get("/cluster", summary="Workers: cores, slots and what runs on them")
    async def cluster(caller: Caller = Depends(authorized)):
        view = await gateway.cluster_status(caller)  # `pair` only for a broker pair (README "A broker pair")
        return {"workers": view["workers"], **({"pair": view["pair"]} if view["pair"] else {})}

    @v1.get("/presets", summary="The named config sets a spec can use", dependencies=[Depends(authorized)])
    async def presets():
        return {"presets": gateway.presets()}

    app.include_router(v1)

    @app.get("/healthz", summary="Whether the broker answers (details with a token)")
    async def healthz(authorization: str | None = Header(default=None)):
        detailed = tokens.who(authorization) is not None
        try:
            health = await gateway.ping()
        except Unavailable as exc:
            return JSONResponse({"ok": False, **({"error": str(exc)} if detailed else {})}, status_code=503)
        return health if detailed else {"ok": True}

    from nsd.gateway.legacy import legacy_router

    app.include_router(legacy_router(gateway, authorized, tokens, keepalive_s))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/swagger", StaticFiles(directory=SWAGGER_UI), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(DOCS)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    return app


def _errors(app: FastAPI) -> None:
    def answer(status: int, error: str, **extra) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": error, **extra}, status_code=status, headers=headers)

    handlers = {
        Unauthorized: lambda exc: answer(401, "missing or unknown bearer token"),
        NotFound: lambda exc: answer(404, str(exc)),
        Invalid: lambda exc: answer(422, "invalid task spec", problems=exc.problems),
        BadRequest: lambda exc: answer(400, str(exc)),
        Forbidden: lambda exc: answer(403, str(exc)),
        WrongMediaType: lambda exc: answer(415, str(exc)),
        StalledBody: lambda exc: answer(408, str(exc)),
        UploadTooLarge: lambda exc: answer(413, str(exc)),
        BadUpload: lambda exc: answer(400, str(exc)),
        NoArtifact: lambda exc: answer(409, str(exc)),
        TooManyStreams: lambda exc: answer(429, str(exc)),
        Unavailable: lambda exc: answer(503, str(exc)),
        BrokerError: lambda exc: answer(400, str(exc)),
    }
    for kind, make in handlers.items():
        async def handler(request: Request, exc: Exception, make=make) -> Response:
            return make(exc)

        app.add_exception_handler(kind, handler)
