"""Framing between a worker daemon and its runners: a 4-byte big-endian length, then msgpack.

The worker writes a job, and while it runs may write updates for it (`{"rule": ..., "id": ...}`: its
early-stop rule, once the broker knows the goal); the runner reads them between evaluation batches
(`pending`), so its job stream is read unbuffered, straight from the descriptor."""

from __future__ import annotations

import asyncio
import os
import select
import struct
from typing import Any, BinaryIO

import msgpack

_HEADER = struct.Struct(">I")


def encode(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def read_blocking(stream: BinaryIO) -> Any | None:
    """The next message from a blocking stream (the runner side), or None at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    return msgpack.unpackb(body, raw=False)


def read_fd(fd: int) -> Any | None:
    """The next message from a blocking descriptor (the runner's stdin, unbuffered: `pending` must see
    every byte that arrived), or None at end of stream."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0])
    return None if body is None else msgpack.unpackb(body, raw=False)


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        part = os.read(fd, left)
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def pending(fd: int) -> bool:
    """Whether a message (or the end of the stream) waits on the descriptor, without blocking."""
    return bool(select.select([fd], [], [], 0)[0])


async def read_async(reader: asyncio.StreamReader, max_bytes: int = 1 << 32) -> Any | None:
    """The next message from a runner's stdout, or None if the runner is gone. A runner runs a recipe's
    code, so what it sends is bounded: a message over `max_bytes`, one that is not msgpack, or anything but
    a map raises ValueError."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if size > max_bytes:
            raise ValueError(f"a {size}-byte message, over the {max_bytes}-byte limit")
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ValueError(f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ValueError(f"a {type(message).__name__}, not a map")
    return message


class Inbox:
    """The runner's stdin: jobs, and updates for a job (its early-stop rule, once the broker knows the goal),
    kept until that job starts and read between its evaluation batches (`rule`)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.updates: dict[str, dict] = {}  # job id -> its latest update

    def next_job(self) -> dict | None:
        while True:
            message = read_fd(self.fd)
            if not isinstance(message, dict) or "kind" in message:
                return message
            self._keep(message)

    def next_reply(self) -> dict | None:
        """The worker's next answer to a request of this runner's (nsd.worker.measuring), updates kept aside."""
        while True:
            message = read_fd(self.fd)
            if not isinstance(message, dict) or not ("rule" in message and "id" in message):
                return message
            self._keep(message)

    def _keep(self, message: dict) -> None:
        if isinstance(message.get("id"), str) and len(self.updates) < 16:
            self.updates[message["id"]] = message

    def rule(self, job: dict) -> dict | None:
        """The newest rule the worker sent for this job (None: none came), reading what waits now."""
        while pending(self.fd):
            message = read_fd(self.fd)
            if message is None or "kind" in message:  # the stream ended, or a job came early: not ours to eat
                break
            self._keep(message)
        update = self.updates.get(job.get("id"))
        return update.get("rule") if update else None

    def starting(self, job: dict) -> None:
        """Updates for other jobs are stale now (the worker sends them only for the job this runner runs)."""
        self.updates = {k: v for k, v in self.updates.items() if k == job.get("id")}
