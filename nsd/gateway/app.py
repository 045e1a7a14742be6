"""The REST door: JSON under /v1, Server-Sent Events for a task's stream, the web view at `/`.

OpenAPI is served at /openapi.json with interactive docs at /docs. Every /v1 route needs a bearer token
when the gateway has a token file; /healthz, the docs and the static page do not (they hold no data:
the page asks for a token and sends it with each call).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from nsd import __version__
from nsd.client.api import BrokerError
from nsd.gateway.auth import Tokens
from nsd.gateway.config import Limits
from nsd.gateway.service import Gateway, Invalid, NoArtifact, NotFound, Unavailable
from nsd.gateway.streams import sse_stream, stream_archive
from nsd.gateway.uploads import BadUpload, UploadTooLarge

STATIC = Path(__file__).resolve().parent / "static"
TAR_TYPES = ("application/x-tar", "application/tar")


class Unauthorized(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit`: a client cannot make us buffer more."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadTooLarge(f"request body is over the limit of {limit} bytes")
    return bytes(body)


def create_app(gateway: Gateway, tokens: Tokens, limits: Limits = Limits(), keepalive_s: float = 15.0) -> FastAPI:
    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN; ours serves the swagger-ui-bundle
    # package's copy, so the docs work on a machine without internet (below).
    app = FastAPI(title="nsd gateway", version=__version__, docs_url=None,
                  description="Accuracy-aware INC quantization tuning as a service: REST door to the nsd broker.")

    def authorized(authorization: str | None = Header(default=None)) -> str:
        who = tokens.who(authorization)
        if who is None:
            raise Unauthorized()
        return who

    _errors(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.post("/uploads", status_code=201, summary="Upload a file (raw body) or a folder (a tar of its contents)")
    async def post_upload(request: Request, name: str = Query(..., description="file or folder name in the ref"),
                          sha256: str | None = Query(None, description="the body's sha256, checked on arrival")):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_upload:
            raise UploadTooLarge(f"upload of {declared} bytes is over the limit of {limits.max_upload}")
        is_tar = request.headers.get("content-type", "").split(";")[0].strip() in TAR_TYPES
        ref = await gateway.upload(request.stream(), name, is_tar, sha256)
        return {"ref": ref}

    @v1.post("/tasks", status_code=201, summary="Submit a task spec (JSON; file fields hold upload refs)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object", "description": "a task spec (README: Task spec)"}}}}})
    async def post_task(request: Request):
        body = await read_body(request, limits.max_body)
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise Invalid([f"body is not JSON: {exc}"]) from None
        return {"task_id": await gateway.submit(raw)}

    @v1.get("/tasks", summary="All tasks, a summary each")
    async def list_tasks():
        return {"tasks": await gateway.list()}

    @v1.get("/tasks/{task_id}", summary="One task's full view (as `nsd result --json`)")
    async def get_task(task_id: str):
        return await gateway.get(task_id)

    @v1.post("/tasks/{task_id}/cancel", summary="Cancel a task")
    async def cancel_task(task_id: str):
        return await gateway.cancel(task_id)

    @v1.get("/tasks/{task_id}/logs", summary="Each job's log (last 64 KiB), or one trial's")
    async def task_logs(task_id: str, trial: str | None = Query(None, description="a trial index, plan or save")):
        return {"logs": await gateway.logs(task_id, trial)}

    @v1.get("/tasks/{task_id}/artifact", summary="The quantized model folder as a tar",
            response_class=StreamingResponse)
    async def task_artifact(task_id: str):
        return await stream_archive(gateway.artifact(task_id), "application/x-tar", "tar")

    @v1.get("/tasks/{task_id}/events", summary="Server-Sent Events: a snapshot, then every event",
            response_class=StreamingResponse)
    async def task_events(task_id: str, last_event_id: str | None = Header(default=None),
                          after: int | None = Query(None, description="resume after this seq (as Last-Event-ID)")):
        if last_event_id is not None:
            try:
                after = int(last_event_id)
            except ValueError:
                raise Invalid([f"Last-Event-ID {last_event_id!r} is not a seq"]) from None
        await gateway.get(task_id)  # an unknown id is a 404 now, not an empty stream
        body = sse_stream(gateway.events(task_id, after), keepalive_s)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.get("/cluster", summary="Workers: cores, slots and what runs on them")
    async def cluster():
        return {"workers": await gateway.cluster()}

    @v1.get("/presets", summary="The named config sets a spec can use")
    async def presets():
        return {"presets": gateway.presets()}

    app.include_router(v1)

    @app.get("/healthz", summary="Whether the broker answers")
    async def healthz():
        try:
            return await gateway.ping()
        except Unavailable as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=503)

    from nsd.gateway.legacy import legacy_router

    app.include_router(legacy_router(gateway, authorized, tokens))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="nsd gateway — API",
                                   swagger_js_url="/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/swagger/swagger-ui.css", swagger_favicon_url="/swagger/favicon-32x32.png")

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
        UploadTooLarge: lambda exc: answer(413, str(exc)),
        BadUpload: lambda exc: answer(400, str(exc)),
        NoArtifact: lambda exc: answer(409, str(exc)),
        Unavailable: lambda exc: answer(503, str(exc)),
        BrokerError: lambda exc: answer(400, str(exc)),
    }
    for kind, make in handlers.items():
        async def handler(request: Request, exc: Exception, make=make) -> Response:
            return make(exc)

        app.add_exception_handler(kind, handler)
