"""The client's side of tenants (README "Privacy"): erasing a task, the audit log, purging the metric cache,
how the broker sees this key, and — for a gateway — acting for the tenant of each request.

A part of `nsd.client.api.AsyncClient` (it uses its `request` and `hello`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

from nsd.protocol import Cmd

# The tenant requests act for (a gateway's client: `acting_for`), per asyncio task or thread.
_ACTING: contextvars.ContextVar[tuple[Any, dict] | None] = contextvars.ContextVar("nsd_acting_for", default=None)


class Privacy:
    @contextlib.contextmanager
    def acting_for(self, tenant: str, code: bool = False):
        """Within this block (this asyncio task, or this thread for `Client`), requests act for `tenant`,
        and a submit carries the right to run a python recipe when `code`. The broker honours it only from a
        key allowed with `nsd keys allow --role gateway`; any other key is refused."""
        token = _ACTING.set((self, {"tenant": tenant, "code": bool(code)}))
        try:
            yield self
        finally:
            _ACTING.reset(token)

    def _acting_fields(self, cmd: Cmd) -> dict[str, Any]:
        acting = _ACTING.get()
        if acting is None or acting[0] is not self:
            return {}
        fields = acting[1]
        return {"tenant": fields["tenant"], **({"code": True} if cmd is Cmd.SUBMIT and fields["code"] else {})}

    async def delete(self, task_id: str) -> dict[str, Any]:
        """Erase the task and what is kept about it on the broker and its workers; a running task is
        cancelled first. Answers {task_id, blobs_dropped}."""
        return await self.request(Cmd.DELETE_TASK, task_id=task_id)

    async def audit(self, task_id: str | None = None, owner: str | None = None, limit: int = 100,
                    before: int | None = None) -> list[dict[str, Any]]:
        """The audit log, newest first (admin keys): [{id, ts, tenant, actor, action, task_id, detail}]."""
        filters = {k: v for k, v in (("task_id", task_id), ("owner", owner), ("before", before)) if v is not None}
        return (await self.request(Cmd.AUDIT, limit=limit, **filters))["entries"]

    async def cache_purge(self, task_id: str | None = None, worker: str | None = None, all: bool = False) -> int:
        """Drop metric cache entries: one task's, one worker's (admins), or all (an admin: the whole cache;
        anyone else: their tenant's). Returns how many went."""
        which = {k: v for k, v in (("task_id", task_id), ("worker", worker), ("all", all or None)) if v is not None}
        return (await self.request(Cmd.CACHE_PURGE, **which))["purged"]

    async def whoami(self) -> dict[str, Any]:
        """How the broker sees this connection: {role, name, tenant, code}."""
        return (await self.hello()).get("you", {"role": "dev", "name": "", "tenant": "", "code": True})
