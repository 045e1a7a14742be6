"""The worker's blob cache: fetched blobs unpacked under their hash, size-bounded, least recently used
evicted first, never one that a running job uses. A blob the broker erased (DROP: its task was deleted)
goes at once, or as soon as the last job using it lets go."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Awaitable, Callable

from nsd.blobs import disk_bytes, unpack_tree


class BlobCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.pins: dict[str, int] = {}  # sha256 -> jobs using it
        self.doomed: set[str] = set()  # erased while pinned: removed at the last unpin
        self.fetched = 0  # blobs fetched from the broker (the rest came from the cache)
        self._locks: dict[str, asyncio.Lock] = {}  # one fetch per blob, however many slots want it at once

    def entry(self, sha256: str) -> Path:
        return self.root / sha256

    async def path(self, sha256: str, name: str, download: Callable[[str, Path], Awaitable[None]]) -> Path:
        """The local path of a blob's top-level entry, fetching and unpacking it first if needed.
        `download(sha, file)` writes the verified tar to `file`."""
        entry = self.entry(sha256)
        async with self._locks.setdefault(sha256, asyncio.Lock()):
            return await self._path(entry, sha256, name, download)

    async def _path(self, entry: Path, sha256: str, name: str, download) -> Path:
        if not (entry / "tree" / name).exists():
            tar = self.root / f"{sha256}.tar.partial"
            try:
                await download(sha256, tar)
                unpack_tree(tar, entry / "tree")
            finally:
                tar.unlink(missing_ok=True)
            # What the unpacked tree takes on disk, not the blob's size nor the files' declared sizes.
            (entry / "size").write_text(str(disk_bytes(entry / "tree")))
            self.fetched += 1
        os.utime(entry / "size")  # last use, for LRU
        return entry / "tree" / name

    def pin(self, sha256: str) -> None:
        self.pins[sha256] = self.pins.get(sha256, 0) + 1

    def unpin(self, sha256: str) -> None:
        if self.pins.get(sha256, 0) <= 1:
            self.pins.pop(sha256, None)
            if sha256 in self.doomed:
                self.drop(sha256)
        else:
            self.pins[sha256] -= 1

    def drop(self, sha256: str) -> None:
        """Erase a blob from the cache (now, or when no job uses it any more)."""
        if sha256 in self.pins:
            self.doomed.add(sha256)
            return
        self.doomed.discard(sha256)
        shutil.rmtree(self.entry(sha256), ignore_errors=True)
        (self.root / f"{sha256}.tar.partial").unlink(missing_ok=True)

    def evict(self) -> list[str]:
        """Drop least recently used entries until the cache fits; returns what was dropped."""
        entries = []
        for entry in self.root.iterdir():
            size_file = entry / "size"
            if entry.is_dir() and size_file.is_file():
                entries.append((size_file.stat().st_mtime, int(size_file.read_text() or 0), entry))
        total = sum(size for _, size, _ in entries)
        dropped = []
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry.name in self.pins:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= size
            dropped.append(entry.name)
        return dropped

    def clear_partial(self) -> None:
        for leftover in self.root.glob("*.partial"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        for entry in self.root.iterdir():
            if entry.is_dir() and not (entry / "size").is_file():  # unpacked but never finished
                shutil.rmtree(entry, ignore_errors=True)
