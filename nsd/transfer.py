"""Chunked blob transfer, one copy of the loops for everyone who moves blobs: the client and the gateway
(request/reply: BLOB_PUT, BLOB_GET) and the worker (over its DEALER: STORE, and FETCH with a window of
chunks in flight). Callers bring the messaging as a `put(offset, data)` or `get(offset)` coroutine; the
loops here decide offsets, windows, and the hash check. No sockets, no torch.
"""

from __future__ import annotations

import hashlib
import inspect
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, BinaryIO, Callable, Iterator

from nsd.blobs import CHUNK_BYTES, pack_tree


class ChunkWriter:
    """Writes a blob's chunks to a file in order, hashing as it goes; `check` says whether it is whole."""

    def __init__(self, out: BinaryIO, sha256: str):
        self.out, self.sha256, self.offset = out, sha256, 0
        self._digest = hashlib.sha256()

    def add(self, data: bytes, size: int) -> None:
        if not data and self.offset < size:
            raise ValueError(f"blob {self.sha256[:12]}… ended early at {self.offset} of {size} bytes")
        self.out.write(data)
        self._digest.update(data)
        self.offset += len(data)

    def check(self) -> None:
        if self._digest.hexdigest() != self.sha256:
            raise ValueError(f"blob {self.sha256[:12]}… failed its hash check (got {self._digest.hexdigest()[:12]}…)")


def size_and_sha(f: BinaryIO) -> tuple[int, str]:
    """A whole file's size and sha256, read chunk by chunk from its start (never all in memory)."""
    f.seek(0)
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class Packed:
    """A file or folder packed into a blob (nsd.blobs.pack_tree), in a temporary file."""
    file: BinaryIO
    size: int
    sha256: str


@contextmanager
def packed(path: Path, tmp_dir: Path | None = None, follow_links: bool = True) -> Iterator[Packed]:
    """Pack `path` into a temporary file (in `tmp_dir`: the same disk as what it packs, if given); see
    `pack_tree` for `follow_links`."""
    with tempfile.TemporaryFile(dir=tmp_dir) as f:
        pack_tree(Path(path), f, follow_links)
        yield Packed(f, *size_and_sha(f))


async def send_chunks(blob: BinaryIO, put: Callable[[int, bytes], Awaitable[dict]]) -> int:
    """Send a blob chunk by chunk until the receiver says it is complete; returns the bytes it holds.
    Each reply names the offset the receiver wants next (it may hold a prefix already, or lose one)."""
    offset = 0
    while True:
        blob.seek(offset)
        reply = await put(offset, blob.read(CHUNK_BYTES))
        offset = reply["offset"]
        if reply.get("complete"):
            return offset


async def receive_chunks(out: BinaryIO, sha256: str, get: Callable[[int], Awaitable[dict]], window: int = 1) -> None:
    """Fetch a blob into `out` in order, verifying its hash; `get(offset)` asks for the chunk at offset
    and returns an awaitable of its reply ({"data", "size"} or {"error"}). Until the first reply tells
    the size, one request is out; then up to `window` (credit-based flow control)."""
    blob = ChunkWriter(out, sha256)
    size, next_request = None, 0
    pending: dict[int, Awaitable[dict]] = {}
    try:
        while size is None or blob.offset < size:
            offset = blob.offset
            if not pending:
                next_request = offset
            while len(pending) < (1 if size is None else window) and (
                    not pending if size is None else next_request < size):
                pending[next_request] = get(next_request)
                next_request += CHUNK_BYTES
            if offset not in pending:
                raise ValueError(f"blob {sha256[:12]}…: a chunk before offset {offset} was short")
            body = await pending.pop(offset)
            if "error" in body:
                raise ValueError(body["error"])
            data, declared = body.get("data", b""), body.get("size")
            if not isinstance(data, bytes) or not isinstance(declared, int) or size not in (None, declared):
                raise ValueError(f"blob {sha256[:12]}…: malformed chunk at offset {offset}")
            size = declared
            blob.add(data, size)
        blob.check()
    finally:
        for waiting in pending.values():  # requests never awaited: a coroutine is closed, a future cancelled
            if inspect.iscoroutine(waiting):
                waiting.close()
            elif hasattr(waiting, "cancel"):
                waiting.cancel()
