"""Content-addressed blobs: how a file or folder becomes one (a deterministic tar), how it is named in a
spec, and how it is unpacked safely. Used by client, broker and worker; no torch.

A blob is the sha256 of a tar holding exactly one top-level entry (the file or folder's name). The
tar is deterministic (sorted names, zero times and owners), so the same folder always has the same
hash and is uploaded once. A spec names a blob as `nsd-blob:<sha256>/<name>`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024
REF_PREFIX = "nsd-blob:"
_REF = re.compile(r"^nsd-blob:([0-9a-f]{64})/([^/\x00]{1,255})$")
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack_tree(tar_path: Path, dest: Path) -> None:
    """Extract a blob's tar into dest, refusing any member that would land outside it."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise ValueError(f"blob member {member.name!r} is not a file or folder")
            tar.extractall(tmp, filter="data")  # 'data' refuses absolute paths, '..' and device files
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
