"""Streamed answers: an artifact file sent and then removed, and one Server-Sent Event."""

from __future__ import annotations

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
