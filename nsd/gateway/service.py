"""What both doors do, over the broker's client protocol: one place that turns broker answers into
the gateway's own errors (NotFound, Invalid, Unavailable, NoArtifact), so REST and gRPC agree."""

from __future__ import annotations

import contextlib
import tempfile
import zipfile
from pathlib import Path
from typing import Any, AsyncIterator

from nsd import __version__
from nsd.blobs import CHUNK_BYTES, parse_ref, unpack_tree
from nsd.client.api import AsyncClient, BrokerError, BrokerUnavailable
from nsd.gateway import uploads
from nsd.presets import PRESETS, config_set
from nsd.protocol import Cmd
from nsd.spec import SpecError, validate


class NotFound(LookupError):
    pass


class Invalid(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid task spec:\n" + "\n".join(f"  - {p}" for p in problems))


class Unavailable(ConnectionError):
    pass


class NoArtifact(RuntimeError):
    pass


@contextlib.contextmanager
def broker_errors():
    """Broker answers as gateway errors: an unknown or ambiguous id is NotFound, the rest stays BrokerError."""
    try:
        yield
    except BrokerUnavailable as exc:
        raise Unavailable(str(exc)) from None
    except BrokerError as exc:
        message = str(exc)
        if message.startswith(("no task ", "task id ")):
            raise NotFound(message) from None
        raise


class Gateway:
    def __init__(self, client: AsyncClient, max_upload: int):
        self.client = client
        self.max_upload = max_upload
        self.uploaded_bytes = 0  # blob bytes sent on to the broker (content it had already counts 0)

    async def upload(self, chunks: AsyncIterator[bytes], name: str, is_tar: bool, sha256: str | None = None) -> str:
        ref, sent = await uploads.upload(self.client, chunks, name, is_tar, self.max_upload, sha256)
        self.uploaded_bytes += sent
        return ref

    async def ping(self) -> dict[str, Any]:
        with broker_errors():
            hello = await self.client.hello()
        return {"ok": True, "broker": self.client.broker, "gateway_version": __version__,
                "broker_version": hello.get("version")}

    async def submit(self, raw: Any) -> str:
        """Validate as the broker does: file fields must be upload refs (POST /v1/uploads, gRPC Upload)
        unless the model is shared."""
        try:
            spec = validate(raw).to_dict()
        except SpecError as exc:
            raise Invalid(exc.problems) from None
        try:
            with broker_errors():
                # Not client.submit: that checks paths on this machine, and a shared path need only exist
                # on the workers.
                return (await self.client.request(Cmd.SUBMIT, spec=spec))["task_id"]
        except BrokerError as exc:  # e.g. a ref whose blob was never uploaded
            raise Invalid([str(exc)]) from None

    async def get(self, task_id: str) -> dict[str, Any]:
        with broker_errors():
            return await self.client.result(task_id)

    async def list(self) -> list[dict[str, Any]]:
        with broker_errors():
            return await self.client.list()

    async def cancel(self, task_id: str) -> dict[str, Any]:
        with broker_errors():
            return await self.client.cancel(task_id)

    async def logs(self, task_id: str, trial: str | None = None) -> list[dict[str, Any]]:
        with broker_errors():
            return await self.client.logs(task_id, trial)

    async def cluster(self) -> list[dict[str, Any]]:
        with broker_errors():
            return await self.client.cluster()

    async def cluster_status(self) -> dict[str, Any]:
        """Workers, and (a broker pair) which broker serves and how far behind the other one is."""
        with broker_errors():
            return await self.client.cluster_status()

    @staticmethod
    def presets() -> list[dict[str, Any]]:
        return [{"name": name, "about": preset["about"], "config_set": config_set(name)}
                for name, preset in PRESETS.items()]

    async def events(self, task_id: str, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The Clone stream, resumed after seq `after`: what the caller already has is not sent again.

        On resume the broker's snapshot is skipped when it is no newer than `after`; when it is newer the
        caller missed events while away, and gets that snapshot (the whole task) in their place, so the
        stream has no gap and no repeat, and its ids (the seq) only grow."""
        with broker_errors():
            async for event in self.client.events(task_id):
                if after is not None and event["seq"] <= after:
                    continue
                yield event

    @contextlib.asynccontextmanager
    async def artifact(self, task_id: str):
        """(name, path of the artifact's tar), the blob downloaded from the broker and hash-checked."""
        task = await self.get(task_id)
        ref = parse_ref(task.get("artifact"))
        if ref is None:
            raise NoArtifact(f"task {task['task_id']} has no quantized model "
                             f"({task.get('error') or 'it is ' + task['state']})")
        with tempfile.TemporaryDirectory(prefix="nsd-gateway-") as tmp:
            path = Path(tmp) / "artifact.tar"
            with broker_errors():
                await self.client.download(ref[0], path)
            yield task, ref[1], path

    @contextlib.asynccontextmanager
    async def artifact_zip(self, task_id: str):
        """The artifact folder as a zip (the old service's /download), built in a temp file."""
        async with self.artifact(task_id) as (task, name, tar):
            tree = tar.parent / "tree"
            unpack_tree(tar, tree)
            archive = tar.parent / "artifact.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:  # blobs have mtime 0
                for path in sorted(tree.rglob("*")):
                    zf.write(path, path.relative_to(tree).as_posix())
            yield task, name, archive


def file_chunks(path: Path, size: int = CHUNK_BYTES):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
