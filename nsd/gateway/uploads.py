"""Uploads: a request body, streamed to a temp file, packed into nsd's blob format and sent to the broker.

The body never sits in memory whole: it is spooled to disk chunk by chunk (with a size cap), a tar body
is unpacked into a temp folder with only regular files and folders allowed, and the result is packed by
nsd's own deterministic packer, so that the same content uploaded through any door has the same hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import AsyncIterator, BinaryIO

from nsd.blobs import make_ref, pack_tree
from nsd.client.api import AsyncClient
from nsd.protocol import Cmd
from nsd.transfer import send_chunks, size_and_sha

_NAME = re.compile(r"^[^/\\\x00]{1,255}$")


class UploadTooLarge(ValueError):
    pass


class BadUpload(ValueError):
    pass


def check_name(name: str | None) -> str:
    if not name or not _NAME.match(name) or name in (".", ".."):
        raise BadUpload(f"name {name!r} must be a plain file or folder name (no '/', not '.' or '..')")
    return name


async def spool(chunks: AsyncIterator[bytes], out: BinaryIO, limit: int, sha256: str | None = None) -> int:
    """Write the body to `out`, refusing it past `limit` bytes; check its sha256 when one was given."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UploadTooLarge(f"upload is larger than the gateway's limit of {limit} bytes")
        digest.update(chunk)
        out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise BadUpload(f"body does not match its sha256: expected {sha256}, got {digest.hexdigest()}")
    return size


def unpack_folder(tar_path: Path, dest: Path, limit: int) -> None:
    """Extract a tar of a folder's contents into dest: regular files and folders only, nothing outside dest."""
    dest.mkdir()
    total = 0
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            members = tar.getmembers()
            for member in members:
                where = PurePosixPath(member.name)
                if member.issparse() or not (member.isreg() or member.isdir()):
                    raise BadUpload(f"tar member {member.name!r} is not a regular file or folder "
                                    "(links, devices and sparse files are refused)")
                if where.is_absolute() or ".." in where.parts:
                    raise BadUpload(f"tar member {member.name!r} would land outside the folder")
                total += member.size
                if total > limit:
                    raise UploadTooLarge(f"tar unpacks to more than the gateway's limit of {limit} bytes")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError) as exc:
        raise BadUpload(f"body is not a readable tar: {exc}") from None


async def put_blob(client: AsyncClient, tar: BinaryIO) -> tuple[str, int]:
    """Send a packed blob to the broker in chunks, unless it has it already: (its sha256, bytes sent)."""
    size, sha = await asyncio.to_thread(size_and_sha, tar)

    async def put(offset: int, data: bytes) -> dict:
        return await client.request(Cmd.BLOB_PUT, sha256=sha, offset=offset, size=size, data=data)

    if (await client.request(Cmd.BLOB_HAVE, sha256=[sha]))["missing"]:
        return sha, await send_chunks(tar, put)
    return sha, 0


async def upload(client: AsyncClient, chunks: AsyncIterator[bytes], name: str, is_tar: bool, limit: int,
                 sha256: str | None = None) -> tuple[str, int]:
    """The whole upload path: body -> temp file -> (unpacked tar) -> nsd blob -> broker: (ref, bytes sent)."""
    name = check_name(name)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise BadUpload("sha256 must be 64 hex digits")
    with tempfile.TemporaryDirectory(prefix="nsd-gateway-") as tmp:
        body = Path(tmp) / "body"
        with open(body, "wb") as out:
            await spool(chunks, out, limit, sha256)
        tree = Path(tmp) / "tree"
        tree.mkdir()
        # Unpacking and packing a large folder takes seconds: off the event loop, which serves everyone.
        if is_tar:
            await asyncio.to_thread(unpack_folder, body, tree / name, limit)
        else:
            os.replace(body, tree / name)
        with open(Path(tmp) / "blob.tar", "w+b") as blob:
            await asyncio.to_thread(pack_tree, tree / name, blob)
            sha, sent = await put_blob(client, blob)
    return make_ref(sha, name), sent
