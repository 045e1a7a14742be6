"""Content-addressed blobs: how a file or folder becomes one (a deterministic tar), how it is named in a
spec, and how it is unpacked safely. Used by client, broker and worker; no torch.

A blob is the sha256 of a tar holding exactly one top-level entry (the file or folder's name). The
tar is deterministic (sorted names, zero times and owners), so the same folder always has the same
hash and is uploaded once. A spec names a blob as `nsd-blob:<sha256>/<name>`.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024
REF_PREFIX = "nsd-blob:"
_REF = re.compile(r"^nsd-blob:([0-9a-f]{64})/([^/\x00-\x1f\x7f]{1,255})$")  # a name: no separator, no control character
_SHA = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA.match(value))


def make_ref(sha256: str, name: str) -> str:
    return f"{REF_PREFIX}{sha256}/{name}"


def parse_ref(value: object) -> tuple[str, str] | None:
    """(sha256, name) for a blob reference, None for anything else (a plain path)."""
    match = _REF.match(value) if isinstance(value, str) else None
    if match is None or match.group(2) in (".", ".."):
        return None
    return match.group(1), match.group(2)


def pack_tree(path: Path, out: BinaryIO) -> None:
    """Write a deterministic tar of `path` (file or folder) to `out`; symlinks are followed."""
    path = Path(path)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
        return info

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, dereference=True) as tar:
        if path.is_file():
            tar.add(path, arcname=path.name, filter=clean)
            return
        tar.add(path, arcname=path.name, recursive=False, filter=clean)
        for root, dirs, files in os.walk(path, followlinks=True):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                full = Path(root) / name
                tar.add(full, arcname=str(Path(path.name) / full.relative_to(path)), recursive=False, filter=clean)


class BlobMemberError(ValueError):
    """A blob's tar holds a member nsd never packs (and will not unpack)."""


# Member types pack_tree writes (CONTTYPE is a regular file to tarfile and to us).
_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})


def check_member(member: tarfile.TarInfo) -> None:
    """Only regular files and folders. A sparse member (GNU 'S', or PAX GNU.sparse headers) unpacks to
    its declared size, not its stored one: a 2 KiB blob became a 15.6 GB file. Links, devices and fifos
    can point outside the cache or block a reader."""
    kind = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
            tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a fifo", tarfile.GNUTYPE_SPARSE: "a sparse file"}
    if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
        raise BlobMemberError(f"blob member {member.name[:200]!r} is a sparse file; only regular files and "
                              f"folders are accepted")
    if member.type not in _FILE_TYPES and member.type != tarfile.DIRTYPE:
        what = kind.get(member.type, f"of tar type {member.type!r}")
        raise BlobMemberError(f"blob member {member.name[:200]!r} is {what}, not a file or folder; only "
                              f"regular files and folders are accepted")


def disk_bytes(path: Path) -> int:
    """Bytes a tree takes on disk (allocated blocks, links not followed): what a cache must count."""
    total = os.lstat(path).st_blocks * 512
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def unpack_tree(tar_path: Path, dest: Path) -> None:
    """Extract a blob's tar into dest, refusing any member that would land outside it, and any member
    other than a regular file or a folder (check_member) before anything is written."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar.getmembers():
                check_member(member)
            tar.extractall(tmp, filter="data")  # 'data' refuses absolute paths, '..' and device files
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
