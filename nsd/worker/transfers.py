"""The worker's side of blob transfer over its broker connection: FETCH a job's files into the local cache
(a window of chunks in flight) and STORE a saved model. The loops are `nsd.transfer`'s; what is here is
the messaging: requests go out on the daemon's socket, replies (CHUNK, STORE_ACK) come back through
`reply` from the daemon's message handler, matched to their waiter by key.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Callable

from nsd.blobs import CHUNK_BYTES, parse_ref
from nsd.protocol import Cmd
from nsd.spec import PATH_FIELDS
from nsd.transfer import packed, receive_chunks, send_chunks
from nsd.worker.cache import BlobCache


class Transfers:
    def __init__(self, send: Callable[[Cmd, dict], None], blobs: BlobCache, window: int, timeout_s: float):
        self._send, self.blobs, self.window, self.timeout_s = send, blobs, window, timeout_s
        self._replies: dict[tuple, asyncio.Future] = {}  # ("chunk", sha, offset) / ("store", sha) -> reply

    def reply(self, cmd: Cmd, key_body: dict, body: dict) -> None:
        """A CHUNK or STORE_ACK (`body`, or the error it was replaced by) for whoever waits on it."""
        key = ("chunk", key_body["sha256"], key_body["offset"]) if cmd is Cmd.CHUNK else ("store", key_body["sha256"])
        waiter = self._replies.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(body)

    def drop(self, why: str) -> None:
        """The connection ended: transfers waiting on it fail now (the job is requeued), not at their timeout."""
        waiting, self._replies = self._replies, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_result({"error": why})

    def _request(self, key: tuple, cmd: Cmd, body: dict) -> asyncio.Future:
        fut = self._replies[key] = asyncio.get_running_loop().create_future()
        self._send(cmd, body)
        return fut

    async def materialize(self, job: dict, pins: list[str]) -> dict:
        """The job with every blob reference in its spec (and a verify job's `artifact`) replaced by a path in
        the local cache; each blob is pinned (its sha appended to `pins`) until the caller unpins it."""
        if parse_ref(job.get("artifact")) is not None:  # a verify job: the saved model it loads
            sha, name = parse_ref(job["artifact"])
            self.blobs.pin(sha)
            pins.append(sha)
            job = {**job, "artifact": str(await self.blobs.path(sha, name, self.download))}
        spec = job["spec"]
        refs = [(a, b, parse_ref(spec[a].get(b))) for a, b in PATH_FIELDS if parse_ref(spec[a].get(b))]
        if not refs:
            return job
        spec = {key: dict(value) if isinstance(value, dict) else value for key, value in spec.items()}
        for section, key, (sha, name) in refs:
            self.blobs.pin(sha)
            pins.append(sha)
            spec[section][key] = str(await self.blobs.path(sha, name, self.download))
        return {**job, "spec": spec}

    async def download(self, sha256: str, dest: Path) -> None:
        """Fetch a blob in chunks, a window of them in flight, verifying its hash; never all in memory."""
        async def chunk(fut: asyncio.Future, offset: int) -> dict:
            try:
                return await asyncio.wait_for(fut, self.timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(f"blob {sha256[:12]}…: no chunk at offset {offset}") from None

        def get(offset: int):
            body = {"sha256": sha256, "offset": offset, "length": CHUNK_BYTES}
            return chunk(self._request(("chunk", sha256, offset), Cmd.FETCH, body), offset)

        try:
            with open(dest, "wb") as out:
                await receive_chunks(out, sha256, get, self.window)
        finally:  # replies still due are of no use now
            for key in [k for k in self._replies if k[:2] == ("chunk", sha256)]:
                self._replies.pop(key)

    async def upload(self, path: Path) -> str:
        """Pack a folder into a blob and store it on the broker, chunk by chunk; returns its sha256. The
        folder is removed either way (a saved model is of no more use here). A runner made it: links in it
        are refused, never followed (nsd.blobs.pack_tree)."""
        try:
            with packed(path, path.parent, follow_links=False) as blob:
                async def put(offset: int, data: bytes) -> dict:
                    body = {"sha256": blob.sha256, "offset": offset, "size": blob.size, "data": data}
                    ack = await asyncio.wait_for(self._request(("store", blob.sha256), Cmd.STORE, body),
                                                 self.timeout_s)
                    if "error" in ack:
                        raise ValueError(f"broker refused the artifact: {ack['error']}")
                    return ack

                await send_chunks(blob.file, put)
                return blob.sha256
        finally:
            shutil.rmtree(path, ignore_errors=True)
