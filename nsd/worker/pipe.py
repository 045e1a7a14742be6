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


async def read_async(reader: asyncio.StreamReader) -> Any | None:
    """The next message from a runner's stdout, or None if the runner is gone."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        return msgpack.unpackb(await reader.readexactly(size), raw=False)
    except asyncio.IncompleteReadError:
        return None
