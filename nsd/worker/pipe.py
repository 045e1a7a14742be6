"""Framing between a worker daemon and its runners: a 4-byte big-endian length, then msgpack."""

from __future__ import annotations

import asyncio
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
