"""Uploads: a request body, streamed to a temp file, packed into nsd's blob format and sent to the broker.

The body never sits in memory whole: it is spooled to disk chunk by chunk (with a size cap), a tar body
is unpacked into a temp folder with only regular files and folders allowed, and the result is packed by
nsd's own deterministic packer, so that the same content uploaded through any door has the same hash.
tarfile holds each PAX or GNU long-name header whole in memory and spends time on every member: its
header reading is bounded here (header sizes, entries) before it reads each header further.
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

_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}$")  # no separators, no control characters
LONG_HEADERS = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                          tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})


class UploadTooLarge(ValueError):
    pass


class BadUpload(ValueError):
    pass


def check_name(name: str | None) -> str:
    if not name or not _NAME.match(name) or name in (".", ".."):
        raise BadUpload(f"name {name[:300] if name else name!r} must be a plain file or folder name "
                        "(no '/', no control characters, not '.' or '..')")
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


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's own header reading, with bounds checked before each header is read further."""

    max_members, max_header = 0, 0

    def _proc_member(self, tar):
        tar.nsd_headers = getattr(tar, "nsd_headers", 0) + 1  # every header counts, long ones too
        if tar.nsd_headers > self.max_members:
            raise BadUpload(f"tar holds more than {self.max_members} entries (max_tar_members)")
        if self.type in LONG_HEADERS and self.size > self.max_header:
            raise BadUpload(f"tar has a {self.size}-byte extended header (PAX or long name); at most "
                            f"{self.max_header} bytes are accepted")
        if self.type == tarfile.GNUTYPE_SPARSE:  # its extension blocks would be read before any check
            raise BadUpload(f"tar member {self.name[:300]!r} is a sparse file (refused)")
        return super()._proc_member(tar)


def read_members(tar_path: Path, max_members: int, max_header: int) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
    bounded = type("BoundedTarInfo", (_BoundedTarInfo,), {"max_members": max_members, "max_header": max_header})
    tar = None
    try:
        tar = tarfile.open(tar_path, mode="r:", tarinfo=bounded)
        return tar, tar.getmembers()
    except BaseException as exc:
        if tar is not None:
            tar.close()
        if isinstance(exc, RecursionError):  # a chain of long-name headers, each read by the one before
            raise BadUpload("tar has a chain of extended headers too long to read") from None
        raise


def unpack_folder(tar_path: Path, dest: Path, limits) -> None:
    """Extract a tar of a folder's contents into dest: regular files and folders only, nothing outside dest."""
    dest.mkdir()
    total = 0
    try:
        tar, members = read_members(tar_path, limits.max_tar_members, limits.max_tar_header)
        with tar:
            for member in members:
                where = PurePosixPath(member.name)
                if member.issparse() or not (member.isreg() or member.isdir()):
                    raise BadUpload(f"tar member {member.name[:300]!r} is not a regular file or folder "
                                    "(links, devices and sparse files are refused)")
                if where.is_absolute() or ".." in where.parts:
                    raise BadUpload(f"tar member {member.name[:300]!r} would land outside the folder")
                if any(ord(c) < 32 or ord(c) == 127 for c in member.name):
                    raise BadUpload(f"tar member {member.name[:300]!r} has a control character in its name")
                total += member.size
                if total > limits.max_upload:
                    raise UploadTooLarge(f"tar unpacks to more than the gateway's limit of {limits.max_upload} bytes")
            # Every member was checked above; 'data' checks again where this Python has it (3.11.4 on).
            tar.extractall(dest, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
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


async def upload(client: AsyncClient, chunks: AsyncIterator[bytes], name: str, is_tar: bool, limits,
                 sha256: str | None = None) -> tuple[str, int]:
    """The whole upload path: body -> temp file -> (unpacked tar) -> nsd blob -> broker: (ref, bytes sent)."""
    name = check_name(name)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise BadUpload("sha256 must be 64 hex digits")
    with tempfile.TemporaryDirectory(prefix="nsd-gateway-") as tmp:
        body = Path(tmp) / "body"
        with open(body, "wb") as out:
            await spool(chunks, out, limits.max_upload, sha256)
        tree = Path(tmp) / "tree"
        tree.mkdir()
        # Unpacking and packing a large folder takes seconds: off the event loop, which serves everyone.
        if is_tar:
            await asyncio.to_thread(unpack_folder, body, tree / name, limits)
        else:
            os.replace(body, tree / name)
        with open(Path(tmp) / "blob.tar", "w+b") as blob:
            await asyncio.to_thread(pack_tree, tree / name, blob)
            sha, sent = await put_blob(client, blob)
    return make_ref(sha, name), sent
