"""`Client`: the blocking twin of `AsyncClient`, a line per method on a private event loop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Iterator

from nsd.client.api import AsyncClient
from nsd.spec import TaskSpec


class Client:
    """The blocking client: the same calls as AsyncClient, on a private event loop.

    Not for use inside a running event loop (use AsyncClient there)."""

    def __init__(self, broker: str | None = None, timeout_s: float = 10.0,
                 curve_key: str | os.PathLike | None = None, server_key: str | os.PathLike | None = None):
        self._loop = asyncio.new_event_loop()
        try:
            self._async = self._loop.run_until_complete(self._make(broker, timeout_s, curve_key, server_key))
        except BaseException:
            self._loop.close()
            raise

    @staticmethod
    async def _make(broker: str | None, timeout_s: float, curve_key, server_key) -> AsyncClient:
        return AsyncClient(broker, timeout_s, curve_key=curve_key, server_key=server_key)

    @property
    def broker(self) -> str:
        return self._async.broker

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._async.close())
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, spec: dict | TaskSpec | str | os.PathLike) -> str:
        return self._run(self._async.submit(spec))

    def status(self, task_id: str, offset: int | None = None, limit: int | None = None) -> dict[str, Any]:
        return self._run(self._async.status(task_id, offset, limit))

    def delete(self, task_id: str) -> dict[str, Any]:
        return self._run(self._async.delete(task_id))

    def audit(self, task_id: str | None = None, owner: str | None = None, limit: int = 100,
              before: int | None = None) -> list[dict[str, Any]]:
        return self._run(self._async.audit(task_id, owner, limit, before))

    def cache_purge(self, task_id: str | None = None, worker: str | None = None, all: bool = False) -> int:
        return self._run(self._async.cache_purge(task_id, worker, all))

    def whoami(self) -> dict[str, Any]:
        return self._run(self._async.whoami())

    def acting_for(self, tenant: str, code: bool = False):
        """As AsyncClient.acting_for, for the calls made from this thread within the block."""
        return self._async.acting_for(tenant, code)

    def list(self) -> list[dict[str, Any]]:
        return self._run(self._async.list())

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._run(self._async.cancel(task_id))

    def cluster(self) -> list[dict[str, Any]]:
        return self._run(self._async.cluster())

    def cluster_status(self) -> dict[str, Any]:
        return self._run(self._async.cluster_status())

    def logs(self, task_id: str, job: int | str | None = None) -> list[dict[str, Any]]:
        return self._run(self._async.logs(task_id, job))

    def result(self, task_id: str, wait: bool = False, offset: int | None = None,
               limit: int | None = None) -> dict[str, Any]:
        return self._run(self._async.result(task_id, wait=wait, offset=offset, limit=limit))

    def upload(self, path: str | os.PathLike) -> str:
        return self._run(self._async.upload(path))

    def fetch(self, task_id: str, out_dir: str | os.PathLike) -> Path:
        return self._run(self._async.fetch(task_id, out_dir))

    def events(self, task_id: str) -> Iterator[dict[str, Any]]:
        stream = self._async.events(task_id)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())
