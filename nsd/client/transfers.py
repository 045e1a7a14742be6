"""The client's blob transfers: uploading a spec's files, downloading a stored blob, and `fetch` (the
winner's model as a folder, with result.json and a README on loading it).

A part of `AsyncClient` (nsd/client/api.py), which supplies `request` and `result`."""

from __future__ import annotations

import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from nsd.blobs import CHUNK_BYTES, make_ref, parse_ref, unpack_tree
from nsd.client.errors import BrokerError
from nsd.client.readme import loading_readme  # noqa: F401 - also importable from here (the README's one writer)
from nsd.protocol import Cmd
from nsd.transfer import Packed, packed, receive_chunks, send_chunks


class Transfers:
    """AsyncClient's uploads, downloads and fetch (it counts what it sent in `uploaded_bytes`)."""

    async def upload(self, path: str | os.PathLike) -> str:
        """Pack a file or folder into a blob and upload what the broker lacks; returns its reference."""
        path = Path(path)
        with packed(path) as blob:
            if (await self.request(Cmd.BLOB_HAVE, sha256=[blob.sha256]))["missing"]:
                for _ in range(3):
                    moves = self.endpoints.switches
                    try:
                        await send_chunks(blob.file, partial(self._put, blob))
                        break
                    except BrokerError:
                        if self.endpoints.switches == moves:
                            raise  # not cut by a failover (the other broker of a pair starts the upload over)
        return make_ref(blob.sha256, path.name)

    async def _put(self, blob: Packed, offset: int, data: bytes) -> dict[str, Any]:
        reply = await self.request(Cmd.BLOB_PUT, sha256=blob.sha256, offset=offset, size=blob.size, data=data)
        self.uploaded_bytes += len(data)
        return reply

    async def download(self, sha: str, dest: Path) -> None:
        """A stored blob, chunk by chunk, into a file; its hash is checked."""
        async def get(offset: int) -> dict[str, Any]:
            return await self.request(Cmd.BLOB_GET, sha256=sha, offset=offset, length=CHUNK_BYTES)

        with open(dest, "wb") as out:
            try:
                await receive_chunks(out, sha, get)
            except ValueError as exc:
                raise BrokerError(str(exc)) from None

    async def fetch(self, task_id: str, out_dir: str | os.PathLike) -> Path:
        """Write the task's quantized model to out_dir/model, with result.json and a README on loading it."""
        task = await self.result(task_id)
        ref = parse_ref(task.get("artifact"))
        if ref is None:
            why = task["error"] or f"the task is {task['state']}"
            raise BrokerError(f"task {task['task_id']} has no quantized model to fetch ({why})")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / ref[1]
        if target.exists():
            raise FileExistsError(f"{target} already exists; choose another --output folder")
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            await self.download(ref[0], Path(tmp) / "blob.tar")
            unpack_tree(Path(tmp) / "blob.tar", Path(tmp) / "tree")
            os.replace(Path(tmp) / "tree" / ref[1], target)
        (out / "result.json").write_text(json.dumps(task, indent=2, sort_keys=True))
        (out / "README.md").write_text(loading_readme(task, ref[1]))
        return target
