"""The broker's blob folder: content-addressed files, written by chunked uploads and read by range.

Nothing here holds a whole blob in memory: uploads stream to a part file while being hashed, reads
take one chunk from disk. A blob's name is its sha256, checked before it becomes visible; a client
never chooses a path (hashes only), so nothing it sends can point outside this folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from nsd.blobs import CHUNK_BYTES, is_sha256


class BlobError(ValueError):
    """An upload that cannot be accepted (bad hash, wrong offset, size mismatch)."""


@dataclass
class _Upload:
    size: int
    path: Path
    received: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)


class BlobStore:
    def __init__(self, root: Path, max_upload_bytes: int = 1 << 40, max_open_uploads: int = 64):
        self.root = Path(root)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "partial").iterdir():  # uploads cut short by a restart start over
            stale.unlink()
        self.max_upload_bytes = max_upload_bytes
        self.max_open_uploads = max_open_uploads
        self._uploads: dict[tuple[bytes, str], _Upload] = {}

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise BlobError(f"not a sha256: {sha256[:80]!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def write(self, uploader: bytes, sha256: str, offset: int, size: int, data: bytes) -> tuple[int, bool]:
        """Append one chunk of an upload; returns (next offset, complete). Chunks come in order."""
        if self.has(sha256):
            self._uploads.pop((uploader, sha256), None)
            return size, True  # someone uploaded it meanwhile: nothing more to send
        if not 0 <= size <= self.max_upload_bytes:
            raise BlobError(f"blob size {size} out of range")
        if len(data) > CHUNK_BYTES * 4:
            raise BlobError("chunk too large")
        key = (uploader, sha256)
        upload = self._uploads.get(key)
        if offset == 0:
            if upload is not None:
                upload.path.unlink(missing_ok=True)
            while len(self._uploads) >= self.max_open_uploads:  # a flood of abandoned uploads: drop the oldest
                self._abort(next(iter(self._uploads)))
            upload = _Upload(size, self.root / "partial" / f"{sha256}.{uploader.hex()[:32]}")
            upload.path.write_bytes(b"")
            self._uploads[key] = upload
        if upload is None or offset != upload.received or size != upload.size:
            expected = 0 if upload is None else upload.received
            raise BlobError(f"chunk at offset {offset} out of order (expected {expected})")
        if upload.received + len(data) > size:
            self._abort(key)
            raise BlobError("more data than the announced size")
        with open(upload.path, "ab") as f:
            f.write(data)
        upload.digest.update(data)
        upload.received += len(data)
        if upload.received < size:
            return upload.received, False
        del self._uploads[key]
        if upload.digest.hexdigest() != sha256:
            upload.path.unlink(missing_ok=True)
            raise BlobError(f"hash mismatch: the data uploaded as {sha256[:12]}… hashes to "
                            f"{upload.digest.hexdigest()[:12]}…; nothing was stored")
        final = self.path(sha256)
        final.parent.mkdir(exist_ok=True)
        os.replace(upload.path, final)
        return size, True

    def _abort(self, key: tuple[bytes, str]) -> None:
        upload = self._uploads.pop(key, None)
        if upload is not None:
            upload.path.unlink(missing_ok=True)

    def read(self, sha256: str, offset: int, length: int) -> tuple[bytes, int]:
        """(chunk, total size) of a stored blob."""
        if not self.path(sha256).is_file():
            raise BlobError(f"no blob {sha256[:12]}…")
        length = max(0, min(length, CHUNK_BYTES * 4))
        with open(self.path(sha256), "rb") as f:
            f.seek(max(0, offset))
            return f.read(length), os.fstat(f.fileno()).st_size
