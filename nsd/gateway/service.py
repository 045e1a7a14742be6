"""What both doors do, over the broker's client protocol, for one caller at a time: one place that turns
broker answers into the gateway's own errors (NotFound, Invalid, Unavailable, NoArtifact, ...), so REST
and gRPC agree. Every call names its caller: its requests go to the broker for the caller's tenant."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

from nsd import __version__
from nsd.blobs import CHUNK_BYTES
from nsd.client.errors import BrokerError, BrokerUnavailable
from nsd.gateway import uploads
from nsd.gateway.auth import Caller
from nsd.gateway.broker import PAGE, BrokerPool, acting_for
from nsd.gateway.config import Limits
from nsd.gateway.fanout import Feeds
from nsd.presets import PRESETS, config_set
from nsd.protocol import Cmd
from nsd.spec import SpecError, validate


class NotFound(LookupError):
    pass


class Invalid(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid task spec:\n" + "\n".join(f"  - {p}" for p in problems))


class BadRequest(ValueError):
    """A parameter that is not what it must be (not a spec problem): the message says which and why."""


class Forbidden(PermissionError):
    pass


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


@contextlib.contextmanager
def serving(caller: Caller):
    """Requests made inside are the caller's tenant's, and broker answers become gateway errors."""
    with acting_for(caller.tenant), broker_errors():
        yield


def check_page(offset: int, limit: int) -> None:
    if offset < 0 or not 0 <= limit <= PAGE:
        raise BadRequest(f"offset must be 0 or more and limit between 0 and {PAGE} (got {offset}, {limit})")


class Gateway:
    def __init__(self, client: BrokerPool, feeds: Feeds, limits: Limits = Limits()):
        self.client, self.feeds, self.limits = client, feeds, limits
        self.uploaded_bytes = 0  # blob bytes sent on to the broker (content it had already counts 0)
        self._finding: dict[tuple[str, str], asyncio.Future] = {}  # (tenant, id) -> its task's full id

    async def upload(self, caller: Caller, chunks: AsyncIterator[bytes], name: str, is_tar: bool,
                     sha256: str | None = None) -> str:
        with serving(caller):
            async with self.client.own_connection() as connection:
                ref, sent = await uploads.upload(connection, chunks, name, is_tar, self.limits, sha256)
        self.uploaded_bytes += sent
        return ref

    async def ping(self) -> dict[str, Any]:
        with broker_errors():
            hello = await self.client.hello()
        return {"ok": True, "broker": self.client.broker, "gateway_version": __version__,
                "broker_version": hello.get("version")}

    async def submit(self, caller: Caller, raw: Any) -> str:
        """Validate as the broker does: file fields must be upload refs (POST /v1/uploads, gRPC Upload)
        unless the model is shared. A python recipe is code: only a token with the `code` right sends one."""
        try:
            spec = validate(raw).to_dict()
        except SpecError as exc:
            raise Invalid(exc.problems) from None
        if spec["recipe"]["kind"] == "python" and not caller.code:
            raise Forbidden(f"token {caller.tenant!r} may not submit python recipes (code that runs on the "
                            "workers): its line in the token file has no `code`; use a built-in recipe")
        try:
            with serving(caller):
                # Not client.submit: that checks paths on this machine, and a shared path need only exist
                # on the workers.
                # `code`: the token's right, forwarded; a broker honours it only from a gateway key allowed
                # to forward it (README "Privacy").
                return (await self.client.request(Cmd.SUBMIT, spec=spec, code=caller.code))["task_id"]
        except BrokerError as exc:  # e.g. a ref whose blob was never uploaded
            raise Invalid([str(exc)]) from None

    async def get(self, caller: Caller, task_id: str, offset: int = 0, limit: int = PAGE) -> dict[str, Any]:
        """The task view with one page of its trials (`trials_page`: offset, limit, total)."""
        check_page(offset, limit)
        with serving(caller):
            return await self.client.page(task_id, offset, limit)

    async def find(self, caller: Caller, task_id: str) -> str:
        """The full id of the caller's task (NotFound otherwise), at the cost of a page of no trials."""
        with serving(caller):
            return (await self.client.page(task_id, 0, 0, Cmd.STATUS))["task_id"]

    async def list(self, caller: Caller) -> list[dict[str, Any]]:
        with serving(caller):
            return await self.client.list()

    async def cancel(self, caller: Caller, task_id: str) -> dict[str, Any]:
        with serving(caller):
            return await self.client.cancel(task_id)

    async def delete(self, caller: Caller, task_id: str) -> dict[str, Any]:
        """Erase the task and what only it holds (README "Privacy"): the broker's DELETE."""
        with serving(caller):
            return await self.client.delete(task_id)

    async def logs(self, caller: Caller, task_id: str, trial: str | None = None) -> list[dict[str, Any]]:
        with serving(caller):
            return await self.client.logs(task_id, trial)

    async def cluster(self, caller: Caller) -> list[dict[str, Any]]:
        with serving(caller):
            return await self.client.cluster()

    async def cluster_status(self, caller: Caller) -> dict[str, Any]:
        """Workers, and (a broker pair) which broker serves and how far behind the other one is."""
        with serving(caller):
            return await self.client.cluster_status()

    @staticmethod
    def presets() -> list[dict[str, Any]]:
        return [{"name": name, "about": preset["about"], "config_set": config_set(name)}
                for name, preset in PRESETS.items()]

    async def watch(self, caller: Caller, task_id: str, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The task's events, resumed after seq `after`: checked here (an unknown task, a stream over the
        caps), delivered by the iterator returned (the caps are counted while it runs).

        On resume a snapshot no newer than `after` is skipped; a newer one means the caller missed events
        while away, and stands in for them, so the stream has no gap and no repeat, and its ids only grow."""
        self.feeds.check(caller.tenant)
        # A task this tenant's feed follows is known to be this tenant's: no broker read per joining
        # stream; and streams that join at once share one read (300 of them were 300 reads of the task).
        key = (caller.tenant, task_id)
        followed = self.feeds.feeds.get(key)
        if followed is not None and followed.error is None:
            full_id = task_id
        else:
            finding = self._finding.get(key)
            if finding is None:
                finding = self._finding[key] = asyncio.ensure_future(self.find(caller, task_id))
                finding.add_done_callback(lambda _: self._finding.pop(key, None))
            full_id = await asyncio.shield(finding)
        return self._deliver(caller, full_id, after)

    async def _deliver(self, caller: Caller, task_id: str, after: int | None) -> AsyncIterator[dict[str, Any]]:
        with self.feeds.subscribe(caller.tenant, caller.tenant, task_id) as subscription, broker_errors():
            while (event := await subscription.next()) is not None:
                if after is None or event["seq"] > after:
                    yield event

    @contextlib.asynccontextmanager
    async def fetched(self, caller: Caller, task_id: str):
        """(task, folder): the folder `nsd fetch` writes (model/, result.json, README.md), in a temp folder,
        written by the client's own fetch so that both give the same files."""
        with serving(caller):
            task = await self.client.page(task_id, 0, 0)
        if task.get("artifact") is None:
            raise NoArtifact(f"task {task['task_id']} has no quantized model "
                             f"({task.get('error') or 'it is ' + task['state']})")
        # The context is left by whoever ends the download, maybe in another task: hold no tenant across it.
        with tempfile.TemporaryDirectory(prefix="nsd-gateway-") as tmp:
            folder = Path(tmp) / "fetched"
            with serving(caller):
                await self.client.fetch(task["task_id"], folder)
            yield task, folder


def file_chunks(path: Path, size: int = CHUNK_BYTES):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
