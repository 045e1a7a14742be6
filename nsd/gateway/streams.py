"""Streamed answers: an artifact file sent and then removed, and one Server-Sent Event."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from nsd.gateway.service import file_chunks


async def stream_archive(opening, media_type: str, extension: str) -> StreamingResponse:
    """Stream the file an artifact context holds, and remove it after, however the download ends.

    The context is entered here, not in the body, so that an unknown task or a missing model is a JSON
    error answer rather than a broken stream."""
    task, name, path = await opening.__aenter__()
    closed = False

    async def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await opening.__aexit__(None, None, None)

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in file_chunks(path):
                yield chunk
        finally:
            await close()

    return StreamingResponse(body(), media_type=media_type, background=BackgroundTask(close), headers={
        "Content-Disposition": f'attachment; filename="{task["task_id"]}-{name}.{extension}"',
        "Content-Length": str(path.stat().st_size)})


def sse(event: dict[str, Any]) -> str:
    """One Server-Sent Event: id is the task's seq (what Last-Event-ID resumes from), event its kind."""
    return f"id: {event['seq']}\nevent: {event['kind']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def sse_stream(events: AsyncIterator[dict[str, Any]], keepalive_s: float) -> AsyncIterator[str]:
    """Events as SSE text, with a `: keep-alive` comment after each quiet `keepalive_s` (a long trial sends
    nothing for minutes; proxies drop idle connections, and a write is how a gone client is noticed).

    The queue between the broker's stream and the client holds a few events only: a client that reads
    slowly holds the broker stream back instead of making the gateway buffer for it."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=16)

    async def pump() -> None:
        try:
            async for event in events:
                await queue.put((True, event))
            await queue.put((False, None))
        except Exception as exc:  # handed to the reader, who ends the response with it
            await queue.put((False, exc))

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                more, item = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if not more:
                if item is not None:
                    raise item
                return
            yield sse(item)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await events.aclose()
