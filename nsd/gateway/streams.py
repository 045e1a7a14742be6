"""Streamed answers: the fetched folder as a tar (made while it is sent) or a zip, and Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import tarfile
import zipfile
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from nsd.gateway.fanout import SharedEvent, event_json
from nsd.gateway.service import file_chunks

BLOCK = tarfile.BLOCKSIZE
SSE_CHUNK = 64 << 10  # a large event (a snapshot) goes out in slices: a stream holds one slice, not a copy
KEEPALIVE = b": keep-alive\n\n"
COALESCE_S = 0.1  # events this close together share one write


def tar_entries(folder: Path) -> list[tuple[tarfile.TarInfo, Path | None]]:
    """Every folder and file under `folder`, sorted, with the packer's zero times and owners (nsd.blobs):
    the same folder always gives the same tar. Anything else (a link) is not part of a fetched folder."""
    entries = []
    for path in sorted(folder.rglob("*")):
        info = tarfile.TarInfo(path.relative_to(folder).as_posix())
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        if path.is_symlink():
            continue
        if path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            entries.append((info, None))
        elif path.is_file():
            info.size = path.stat().st_size
            info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            entries.append((info, path))
    return entries


def tar_stream(entries: list[tuple[tarfile.TarInfo, Path | None]]) -> tuple[int, Iterator[bytes]]:
    """(size, chunks) of a PAX tar of the entries, made while it is read: nothing is written twice."""
    headers = [info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape") for info, _ in entries]
    size = sum(len(h) + -(-info.size // BLOCK) * BLOCK for h, (info, _) in zip(headers, entries)) + 2 * BLOCK
    end = 2 * BLOCK + (-(size) % tarfile.RECORDSIZE)  # two zero blocks, then a whole record, as tar writes

    def chunks() -> Iterator[bytes]:
        for header, (info, path) in zip(headers, entries):
            yield header
            if path is None:
                continue
            sent = 0
            for chunk in file_chunks(path):
                sent += len(chunk)
                yield chunk
            if sent != info.size:  # the folder is ours and fixed: a change would break the tar
                raise RuntimeError(f"{path} changed while it was sent")
            yield b"\0" * (-info.size % BLOCK)
        yield b"\0" * end

    return size - 2 * BLOCK + end, chunks()


def zip_folder(folder: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:
        for path in sorted(folder.rglob("*")):
            if not path.is_symlink():
                zf.write(path, path.relative_to(folder).as_posix())


async def stream_fetched(opening, kind: str) -> StreamingResponse:
    """The fetched folder (`Gateway.fetched`) as a tar or a zip, removed after however the download ends.

    The context is entered here, not in the body, so that an unknown task or a missing model is a JSON
    error answer rather than a broken stream."""
    task, folder = await opening.__aenter__()
    closed = False

    async def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await opening.__aexit__(None, None, None)

    try:
        if kind == "tar":
            size, chunks = tar_stream(tar_entries(folder))
        else:
            archive = folder.parent / "fetched.zip"
            await asyncio.to_thread(zip_folder, folder, archive)
            size, chunks = archive.stat().st_size, file_chunks(archive)
    except BaseException:
        await close()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in chunks:
                yield chunk
        finally:
            await close()

    media_type = "application/x-tar" if kind == "tar" else "application/zip"
    return StreamingResponse(body(), media_type=media_type, background=BackgroundTask(close), headers={
        "Content-Disposition": f'attachment; filename="{task["task_id"]}.{kind}"', "Content-Length": str(size)})


def sse(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event: id is the task's seq (what Last-Event-ID resumes from), event its kind."""
    def frame() -> bytes:
        return f"id: {event['seq']}\nevent: {event['kind']}\ndata: {event_json(event)}\n\n".encode()
    return event.cached("sse", frame) if isinstance(event, SharedEvent) else frame()


def coalesced(frames: list[bytes]) -> Iterator[bytes | memoryview]:
    """Small frames joined into one write; a large one (a snapshot) sent as slices of itself, never
    copied: it is shared by every stream that sends it."""
    small: list[bytes] = []
    for frame in frames:
        if len(frame) <= SSE_CHUNK:
            small.append(frame)
            continue
        if small:
            yield b"".join(small)
            small = []
        view = memoryview(frame)
        for start in range(0, len(view), SSE_CHUNK):
            yield view[start:start + SSE_CHUNK]
    if small:
        yield b"".join(small)


async def sse_stream(events: AsyncIterator[dict[str, Any]], keepalive_s: float,
                     coalesce_s: float = COALESCE_S) -> AsyncIterator[bytes | memoryview]:
    """Events as SSE, with a `: keep-alive` comment after each quiet `keepalive_s` (a long trial sends
    nothing for minutes; proxies drop idle connections, and a write is how a gone client is noticed).

    The queue between the task's feed and the client holds a few events only: a client that reads
    slowly holds its subscription back (the feed then gives it a snapshot) instead of making the gateway
    buffer for it. Events that arrive within `coalesce_s` of each other go out in one write (each write
    costs the gateway's one event loop more than its bytes do: 300 streams of a busy task were thousands
    of writes a second); an event's frame is made once for all streams and sent in slices of that copy."""
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
                async with asyncio.timeout(keepalive_s):
                    batch = [await queue.get()]
            except TimeoutError:
                yield KEEPALIVE
                continue
            if batch[0][0] and coalesce_s > 0:
                await asyncio.sleep(coalesce_s)
            while batch[-1][0] and not queue.empty():
                batch.append(queue.get_nowait())
            for chunk in coalesced([sse(item) for more, item in batch if more]):
                yield chunk
            more, item = batch[-1]
            if not more:
                if item is not None:
                    raise item
                return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await events.aclose()
