"""nsd.transfer's loops against an in-memory peer: no sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io

import pytest

from nsd.blobs import CHUNK_BYTES
from nsd.transfer import receive_chunks, send_chunks, size_and_sha

BLOB = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3)  # two whole chunks and a short one
SHA = hashlib.sha256(BLOB).hexdigest()


def serving(blob: bytes, asked: list[int]):
    def get(offset: int):
        asked.append(offset)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result({"data": blob[offset:offset + CHUNK_BYTES], "size": len(blob)})
        return fut
    return get


@pytest.mark.parametrize("window", [1, 4])
async def test_a_blob_arrives_whole_in_order_with_one_request_until_the_size_is_known(window):
    out, asked = io.BytesIO(), []
    await receive_chunks(out, SHA, serving(BLOB, asked), window)
    assert out.getvalue() == BLOB and asked == [0, CHUNK_BYTES, 2 * CHUNK_BYTES]


async def test_a_wrong_hash_an_error_reply_or_a_changed_size_is_refused():
    with pytest.raises(ValueError, match="hash check"):
        await receive_chunks(io.BytesIO(), "0" * 64, serving(BLOB, []), 4)

    async def error(offset: int) -> dict:
        return {"error": "no such blob"}
    with pytest.raises(ValueError, match="no such blob"):
        await receive_chunks(io.BytesIO(), SHA, error)

    async def growing(offset: int) -> dict:
        return {"data": BLOB[offset:offset + CHUNK_BYTES], "size": len(BLOB) + offset}
    with pytest.raises(ValueError, match="malformed chunk"):
        await receive_chunks(io.BytesIO(), SHA, growing, 2)


async def test_sending_resumes_where_the_receiver_asks_and_ends_when_it_is_complete():
    held = bytearray(BLOB[:CHUNK_BYTES])  # the receiver holds a prefix already

    async def put(offset: int, data: bytes) -> dict:
        if offset != len(held):
            return {"offset": len(held), "complete": False}
        held.extend(data)
        return {"offset": len(held), "complete": len(held) == len(BLOB)}

    assert await send_chunks(io.BytesIO(BLOB), put) == len(BLOB)
    assert bytes(held) == BLOB
    assert size_and_sha(io.BytesIO(BLOB)) == (len(BLOB), SHA)
