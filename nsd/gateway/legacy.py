"""The old Neural Solution service's paths, for users moving over, where their meaning carries
(README "REST and gRPC gateway" maps each to nsd's own). Same tokens as /v1."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse

from nsd.client.view import apply_event, fold_event, progress_line
from nsd.gateway.auth import Caller, Tokens
from nsd.gateway.fanout import TooManyStreams
from nsd.gateway.service import Gateway, NotFound, Unavailable
from nsd.gateway.streams import stream_fetched


def old_status(task: dict[str, Any]) -> dict[str, Any]:
    """Neural Solution's /task/status answer: a status word and, once done, the optimized result."""
    answer: dict[str, Any] = {"status": task["state"], "task_id": task["task_id"]}
    if task.get("winner"):
        timings = task.get("timings") or {}
        seconds = (timings.get("finished") or 0) - (timings.get("started") or 0) if timings.get("started") else None
        answer["optimized_result"] = {"optimization time (seconds)": seconds, "accuracy": task["winner"]["metric"],
                                      "baseline": task["baseline"], "config": task["winner"]["label"]}
        answer["result_path"] = f"/download/{task['task_id']}"
    if task.get("error"):
        answer["error"] = task["error"]
    return answer


def legacy_router(gateway: Gateway, authorized, tokens: Tokens, keepalive_s: float = 15.0) -> APIRouter:
    legacy = APIRouter(tags=["Neural Solution compatible"])

    @legacy.get("/ping", dependencies=[Depends(authorized)], summary="Old /ping: is the service (and its broker) up")
    async def ping():
        try:
            await gateway.ping()
            return {"status": "Healthy", "msg": "nsd gateway and broker are up"}
        except Unavailable as exc:
            return {"status": "Failed", "msg": str(exc)}

    @legacy.get("/cluster", summary="Old /cluster: the workers")
    async def cluster(caller: Caller = Depends(authorized)):
        return {"Cluster info": await gateway.cluster(caller)}

    @legacy.get("/task/status/{task_id}", summary="Old /task/status")
    async def status(task_id: str, caller: Caller = Depends(authorized)):
        return old_status(await gateway.get(caller, task_id, 0, 0))

    @legacy.get("/task/log/{task_id}", response_class=PlainTextResponse,
                summary="Old /task/log: every job's log as text")
    async def log(task_id: str, caller: Caller = Depends(authorized)):
        logs = await gateway.logs(caller, task_id)
        return "".join(f"==> {entry['job']} (attempt {entry['attempt']}, {entry['worker']}) <==\n{entry['text']}\n"
                       for entry in logs)

    @legacy.get("/download/{task_id}", response_class=StreamingResponse,
                summary="Old /download: the folder `nsd fetch` writes (model/, result.json, README.md) as a zip")
    async def download(task_id: str, caller: Caller = Depends(authorized)):
        return await stream_fetched(gateway.fetched(caller, task_id), "zip")

    @legacy.websocket("/task/screen/{task_id}")
    async def screen(websocket: WebSocket, task_id: str):
        """Old /task/screen: one progress line per event until the task ends, or the client leaves."""
        caller = tokens.who(websocket.headers.get("authorization"))
        if caller is None:
            await websocket.close(code=1008, reason="missing or unknown bearer token")
            return
        await websocket.accept()
        try:
            events = await gateway.watch(caller, task_id)
        except (NotFound, TooManyStreams) as exc:
            await websocket.close(code=1008 if isinstance(exc, NotFound) else 1013, reason=str(exc)[:120])
            return

        async def follow() -> None:
            task = None
            async for event in events:
                if event["kind"] == "snapshot":
                    task = apply_event(task, event)  # a copy: the snapshot is shared with other streams
                else:
                    fold_event(task, event)
                await websocket.send_text(progress_line(task))

        async def departure() -> None:  # the old clients send nothing: a receive returns when they leave
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass

        # A quiet task sends nothing, so a send would never notice a client gone: wait on both, and stop
        # following the task (and hold no stream for it) as soon as the client leaves.
        following, leaving = asyncio.create_task(follow()), asyncio.create_task(departure())
        try:
            await asyncio.wait({following, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (following, leaving):
                task.cancel()
            await asyncio.gather(following, leaving, return_exceptions=True)
            await events.aclose()
        if leaving.done() and not leaving.cancelled() and leaving.exception() is None:
            return  # gone
        try:
            following.result()
            await websocket.close()
        except NotFound as exc:
            await websocket.close(code=1008, reason=str(exc)[:120])
        except (WebSocketDisconnect, asyncio.CancelledError):
            pass

    return legacy
