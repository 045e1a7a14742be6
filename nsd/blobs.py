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
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

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


def pack_tree(path: Path, out: BinaryIO, follow_links: bool = True) -> None:
    """Write a deterministic tar of `path` (file or folder) to `out`. A client's folder is packed with its
    symlinks followed (a Hugging Face snapshot is links); what a worker packs of a runner's output is not
    (`follow_links=False`: only folders and regular files, opened without following any link, see
    `plain_tree`), so a link a runner planted cannot take a file of the worker's into an artifact."""
    path = Path(path)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
        return info

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, dereference=True) as tar:
        if not follow_links:
            for rel, folder, name, st in plain_tree(path):
                arcname = str(Path(path.name) / rel) if rel else path.name
                info = tarfile.TarInfo(arcname)
                info.mode = st.st_mode
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(clean(info))
                    continue
                with open_plain(name, folder) as f:
                    info.size = os.fstat(f.fileno()).st_size
                    tar.addfile(clean(info), f)
            return
        if path.is_file():
            tar.add(path, arcname=path.name, filter=clean)
            return
        tar.add(path, arcname=path.name, recursive=False, filter=clean)
        for root, dirs, files in os.walk(path, followlinks=True):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                full = Path(root) / name
                tar.add(full, arcname=str(Path(path.name) / full.relative_to(path)), recursive=False, filter=clean)


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def plain_tree(root: Path) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """Every folder and regular file of `root` (itself first, then sorted, depth first) as (path relative
    to root, the descriptor of its folder, its name there, its lstat), never following a link: folders are
    opened by descriptor with O_NOFOLLOW, so a link swapped in while we walk is never crossed. Anything
    but a folder or a regular file raises BlobMemberError. Only `root`'s last component may be untrusted."""
    root = Path(root)
    parent = os.open(root.parent, _NOFOLLOW_DIR & ~os.O_NOFOLLOW)
    try:
        yield from _plain_entry("", parent, root.name)
    finally:
        os.close(parent)


def _plain_entry(rel: str, folder: int, name: str) -> Iterator[tuple[str, int, str, os.stat_result]]:
    st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    if stat.S_ISREG(st.st_mode):
        yield rel, folder, name, st
        return
    if not stat.S_ISDIR(st.st_mode):
        raise BlobMemberError(f"{rel or name!r} is not a regular file or a folder")
    yield rel, folder, name, st
    fd = os.open(name, _NOFOLLOW_DIR, dir_fd=folder)
    try:
        for child in sorted(os.listdir(fd)):
            yield from _plain_entry(f"{rel}/{child}" if rel else child, fd, child)
    finally:
        os.close(fd)


def open_plain(name: str, folder: int) -> BinaryIO:
    """A regular file `name` in the folder open as descriptor `folder`, opened without following a link
    (and without blocking on a fifo); anything else raises BlobMemberError."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BlobMemberError(f"{name!r} is not a regular file")
    return os.fdopen(fd, "rb")


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


# PEP 706's extraction filter came with Python 3.11.4; Debian 12's python3 is 3.11.2. Where it is missing,
# its checks that matter here are ours: check_member allows only files and folders, _check_path keeps each
# inside the destination, and modes are cut to what pack_tree writes.
_DATA_FILTER = hasattr(tarfile, "data_filter")


def _check_path(member: tarfile.TarInfo) -> None:
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or not parts:
        raise BlobMemberError(f"blob member {member.name[:200]!r} would land outside the destination folder")
    member.mode = 0o755 if member.isdir() or member.mode & 0o111 else 0o644


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
                if not _DATA_FILTER:
                    _check_path(member)
            if _DATA_FILTER:
                tar.extractall(tmp, filter="data")  # 'data' refuses absolute paths, '..' and device files
            else:
                tar.extractall(tmp)  # every member checked above
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
