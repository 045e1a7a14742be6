"""The broker's blob folder: content-addressed files, written by chunked uploads and read by range.

Nothing here holds a whole blob in memory: uploads stream to a part file while being hashed, reads
take one chunk from disk. A blob's name is its sha256, checked before it becomes visible; a client
never chooses a path (hashes only), so nothing it sends can point outside this folder.

Whose bytes a blob is, is the broker's to say (`nsd.broker.tenancy`): an uploader that does not already
own a stored blob (`known=False`) sends and has checked every byte, exactly as if it were new, so that
an upload never tells one tenant that another holds the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nsd.blobs import CHUNK_BYTES, is_sha256

log = logging.getLogger("nsd.broker")


class BlobError(ValueError):
    """An upload that cannot be accepted (bad hash, wrong offset, size mismatch)."""


@dataclass
class _Upload:
    size: int
    path: Path
    received: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    touched: float = field(default_factory=time.monotonic)


class BlobStore:
    """Bounds (README "Security"): `max_blob_bytes` per blob; `max_store_bytes` for the whole folder, kept by
    removing blobs no task names, oldest first, before an upload that would not fit is refused;
    `uploads_per_peer` open uploads per peer (a peer's flood of abandoned uploads drops only its own
    oldest), `max_open_uploads` in all (past it, new uploads are refused, never someone else's dropped)
    and uploads silent for `upload_idle_s` are dropped."""

    def __init__(self, root: Path, max_blob_bytes: int = 64 << 30, max_store_bytes: int = 512 << 30,
                 uploads_per_peer: int = 16, max_open_uploads: int = 1024, upload_idle_s: float = 600.0,
                 referenced: Callable[[], set[str]] = set):
        self.root = Path(root)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "partial").iterdir():  # uploads cut short by a restart start over
            stale.unlink()
        self.max_blob_bytes, self.max_store_bytes = max_blob_bytes, max_store_bytes
        self.uploads_per_peer, self.max_open_uploads = uploads_per_peer, max_open_uploads
        self.upload_idle_s = upload_idle_s
        self.referenced = referenced  # hashes some task names: never removed
        self._uploads: dict[tuple[bytes, str], _Upload] = {}
        self._per_peer: dict[bytes, int] = {}
        # A broker pair (nsd.broker.peer): blobs stored here but not yet on the passive broker are hidden
        # from `has` (no client learns of them), and `on_stored` hears of each blob as it completes.
        self.hidden: set[str] = set()
        self.on_stored: Callable[[str], None] | None = None
        self.stored_bytes = sum(p.stat().st_size for p in self._blob_files())

    def _blob_files(self) -> list[Path]:
        return [p for d in self.root.iterdir() if len(d.name) == 2 for p in d.iterdir() if p.is_file()]

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise BlobError(f"not a sha256: {sha256[:80]!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.stored(sha256) and sha256 not in self.hidden

    def stored(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path(sha256).is_file()

    def names(self, after: str = "", limit: int = 1000) -> list[str]:
        """Stored blobs in name order, after `after` (a page of the listing a passive broker asks for)."""
        return sorted(p.name for p in self._blob_files() if p.name > after and is_sha256(p.name))[:limit]

    def adopt(self, sha256: str, part: Path) -> None:
        """A whole blob fetched from the other broker of a pair (its hash checked on the way): stored."""
        final = self.path(sha256)
        final.parent.mkdir(exist_ok=True)
        if not final.is_file():
            self.stored_bytes += part.stat().st_size
        os.replace(part, final)

    def expire(self, now: float) -> None:
        """Drop uploads silent for longer than upload_idle_s."""
        for key in [k for k, u in self._uploads.items() if now - u.touched > self.upload_idle_s]:
            self._abort(key)

    def _make_room(self, size: int) -> None:
        """Remove unreferenced blobs, oldest first, until `size` more bytes fit; BlobError if they cannot."""
        if self.stored_bytes + self._reserved() + size <= self.max_store_bytes and self._disk_has(size):
            return
        keep = self.referenced()
        for path in sorted(self._blob_files(), key=lambda p: p.stat().st_mtime):
            if path.name in keep:
                continue
            self.stored_bytes -= path.stat().st_size
            path.unlink(missing_ok=True)
            log.info("removed unreferenced blob %s to make room", path.name[:12])
            if self.stored_bytes + self._reserved() + size <= self.max_store_bytes and self._disk_has(size):
                return
        raise BlobError(f"broker storage is full: no room for a blob of {size} bytes (store limit "
                        f"{self.max_store_bytes} bytes, every stored blob is in use)")

    def _reserved(self) -> int:
        return sum(u.size - u.received for u in self._uploads.values())

    def _disk_has(self, size: int) -> bool:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize - self._reserved() >= size + (64 << 20)  # keep 64 MiB for SQLite

    def write(self, uploader: bytes, sha256: str, offset: int, size: int, data: bytes,
              known: bool = True) -> tuple[int, bool]:
        """Append one chunk of an upload; returns (next offset, complete). Chunks come in order. `known`:
        the uploader may learn that the blob is stored already (it owns it), so the upload stops there."""
        if not is_sha256(sha256):  # before anything becomes a path
            raise BlobError(f"not a sha256: {str(sha256)[:80]!r}")
        if known and self.stored(sha256):
            self._abort((uploader, sha256))
            return size, True  # it uploaded these bytes meanwhile: nothing more to send
        if not 0 <= size <= self.max_blob_bytes:
            raise BlobError(f"blob size {size} is over the broker's limit of {self.max_blob_bytes} bytes")
        if len(data) > CHUNK_BYTES * 4:
            raise BlobError("chunk too large")
        key = (uploader, sha256)
        upload = self._uploads.get(key)
        if offset == 0:
            self._abort(key)
            if self._per_peer.get(uploader, 0) >= self.uploads_per_peer:  # this peer's oldest upload goes
                self._abort(next(k for k in self._uploads if k[0] == uploader))
            if len(self._uploads) >= self.max_open_uploads:
                raise BlobError(f"the broker has {len(self._uploads)} uploads in progress (its limit); try again later")
            self._make_room(size)
            upload = _Upload(size, self.root / "partial" / f"{sha256}.{hashlib.sha256(uploader).hexdigest()[:32]}")
            upload.path.write_bytes(b"")
            self._uploads[key] = upload
            self._per_peer[uploader] = self._per_peer.get(uploader, 0) + 1
        if upload is None or offset != upload.received or size != upload.size:
            expected = 0 if upload is None else upload.received
            raise BlobError(f"chunk at offset {offset} out of order (expected {expected})")
        if upload.received + len(data) > size:
            self._abort(key)
            raise BlobError("more data than the announced size")
        try:
            with open(upload.path, "ab") as f:
                f.write(data)
        except OSError as exc:
            self._abort(key)
            raise BlobError(f"broker storage failed: {exc.strerror or exc}") from None
        upload.digest.update(data)
        upload.received += len(data)
        upload.touched = time.monotonic()
        if upload.received < size:
            return upload.received, False
        self._abort(key, keep_file=True)
        if upload.digest.hexdigest() != sha256:
            upload.path.unlink(missing_ok=True)
            raise BlobError(f"hash mismatch: the data uploaded as {sha256[:12]}… hashes to "
                            f"{upload.digest.hexdigest()[:12]}…; nothing was stored")
        final = self.path(sha256)
        if final.is_file():  # the same bytes were stored already (by another tenant): checked, kept once
            upload.path.unlink(missing_ok=True)
            return size, True
        final.parent.mkdir(exist_ok=True)
        os.replace(upload.path, final)
        self.stored_bytes += size
        if self.on_stored is not None:
            self.on_stored(sha256)
        return size, True

    def remove(self, sha256: str) -> None:
        """Erase a stored blob (a deleted task's, that nobody else owns or names)."""
        path = self.path(sha256)
        try:
            self.stored_bytes -= path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
        for key in [k for k in self._uploads if k[1] == sha256]:
            self._abort(key)

    def _abort(self, key: tuple[bytes, str], keep_file: bool = False) -> None:
        upload = self._uploads.pop(key, None)
        if upload is None:
            return
        left = self._per_peer.get(key[0], 1) - 1
        if left:
            self._per_peer[key[0]] = left
        else:
            self._per_peer.pop(key[0], None)
        if not keep_file:
            upload.path.unlink(missing_ok=True)

    def read(self, sha256: str, offset: int, length: int) -> tuple[bytes, int]:
        """(chunk, total size) of a stored blob."""
        if not self.path(sha256).is_file():
            raise BlobError(f"no blob {sha256[:12]}…")
        length = max(0, min(length, CHUNK_BYTES))  # one chunk per reply bounds what a peer's queue holds
        with open(self.path(sha256), "rb") as f:
            f.seek(max(0, offset))
            return f.read(length), os.fstat(f.fileno()).st_size
