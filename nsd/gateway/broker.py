"""The gateway's broker client: a few connections, so that no user's slow request holds up another's, each
request carrying the tenant it is made for, and task views read in pages.

One AsyncClient holds one request in flight at a time (Lazy Pirate: one DEALER, a lock). In front of many
users that lock was one queue for everyone (a 20,000-trial STATUS held every other user's GET), so the
gateway lends each request the first idle of `size` connections (sharing one ZeroMQ context). An upload is
one connection's from its first chunk to its last: the broker keys a partial upload by its connection.

Tenants (README "Privacy"): with CURVE the gateway's key is in the broker's gateway allowlist, and every
request names the tenant it acts for (the `tenant` field; the broker honours it only from gateway keys).
Without CURVE the broker has one tenant, so nothing is named.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
from typing import Any, AsyncIterator

from nsd.client.api import AsyncClient
from nsd.client.errors import BrokerError
from nsd.protocol import Cmd

ACTING: contextvars.ContextVar[str] = contextvars.ContextVar("nsd_gateway_tenant", default="")
PAGE = 1000  # trials per page: a page of a task view stays far below one message's limit (the broker's is more)


@contextlib.contextmanager
def acting_for(tenant: str):
    """Requests made inside (in this task) are made for `tenant`."""
    token = ACTING.set(tenant)
    try:
        yield
    finally:
        ACTING.reset(token)


class TenantClient(AsyncClient):
    """An AsyncClient whose every request names the tenant being served (when tenants are on)."""

    def __init__(self, *args, name_tenant: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.name_tenant = name_tenant

    async def request(self, cmd: Cmd, **body: Any) -> dict[str, Any]:
        tenant = ACTING.get()
        if self.name_tenant and tenant:
            body["tenant"] = tenant
        return await super().request(cmd, **body)


class BrokerPool(TenantClient):
    """AsyncClient's calls (result, logs, fetch, events, ...) over `size` connections."""

    def __init__(self, broker: str | None = None, size: int = 8, **kwargs):
        super().__init__(broker, **kwargs)
        self._kwargs = kwargs
        self._lanes = [self._lane() for _ in range(size)]
        self._idle: asyncio.Queue[TenantClient] = asyncio.Queue()
        for lane in self._lanes:
            self._idle.put_nowait(lane)
        self.sent: collections.Counter[tuple[Cmd, int | None]] = collections.Counter()  # (request, its limit)

    async def request(self, cmd: Cmd, **body: Any) -> dict[str, Any]:
        self.sent[cmd, body.get("limit")] += 1
        lane = await self._idle.get()
        try:
            return await lane.request(cmd, **body)
        finally:
            self._idle.put_nowait(lane)

    def _lane(self) -> TenantClient:
        lane = TenantClient(self.broker, ctx=self.ctx, **self._kwargs)
        lane.endpoints = self.endpoints  # a broker pair: one lane's failover moves them all
        return lane

    @contextlib.asynccontextmanager
    async def own_connection(self) -> AsyncIterator[TenantClient]:
        """A connection of its own, for a conversation the broker ties to one connection (an upload)."""
        lane = self._lane()
        try:
            yield lane
        finally:
            await lane.close()

    def secure(self, sock) -> None:
        """CURVE on a socket of the gateway's own (an event subscription), as on its connections."""
        if self._curve is not None:
            self._curve.apply(sock)

    async def close(self) -> None:
        for lane in self._lanes:
            await lane.close()
        await super().close()

    async def page(self, task_id: str, offset: int, limit: int, cmd: Cmd = Cmd.RESULT_GET) -> dict[str, Any]:
        """The task view with trials[offset:offset + limit] and `trials_page` {offset, limit, total}; a
        page of no trials (limit 0) is the cheapest read of a task's seq and state."""
        reply = await self.request(cmd, task_id=task_id, offset=offset, limit=max(limit, 1))  # the broker's least
        view = paged(reply, offset, limit)
        if len(view["trials"]) > limit:
            view["trials"] = view["trials"][:limit]
        view["trials_page"] = {**view["trials_page"], "limit": limit}
        return view

    async def whole(self, task_id: str, cmd: Cmd = Cmd.STATUS, tries: int = 8) -> dict[str, Any]:
        """The task view with every trial, labelled with its first page's seq.

        Pages that all carry that seq make an exact view; when the task kept changing through `tries` reads
        (thousands of trials ending faster than the pages are read), the last read keeps its later pages as
        they come. Such a view may hold trials newer than its seq, never fewer trials than the seq had; the
        events after the seq, applied in order (nsd.client.view.fold_event sets fields, it adds nothing but a
        stage's trials), bring every trial to where the broker has it. Refusing instead left a busy task's
        event streams without a first event."""
        for attempt in range(tries):
            reply = await self.request(cmd, task_id=task_id, offset=0, limit=PAGE)
            if page_of(reply) is None:
                return reply["task"]  # a broker that does not page sent it whole
            first = paged(reply, 0, PAGE)
            trials, total = list(first.pop("trials")), first.pop("trials_page")["total"]
            exact = attempt < tries - 1
            while len(trials) < total:
                more = await self.page(first["task_id"], len(trials), PAGE, cmd)
                if not more["trials"] or (exact and more["seq"] != first["seq"]):
                    break
                trials += more["trials"]
            else:
                return {**first, "trials": trials[:total]}  # not a stage's trials added after the first page
        raise BrokerError(f"task {task_id} lost trials while its {PAGE}-trial pages were read; try again")


def page_of(reply: dict[str, Any]) -> dict[str, int] | None:
    """The broker's `trials_page`, where it pages (on the reply or its task); None where it sends every trial."""
    page = reply.get("trials_page")
    return page if page is not None else reply["task"].get("trials_page")


def paged(reply: dict[str, Any], offset: int, limit: int) -> dict[str, Any]:
    """One page of the reply's task view, as the broker paged it or, from a broker that does not, cut here."""
    task, page = reply["task"], page_of(reply)
    if page is None:
        trials = task["trials"]
        return {**task, "trials": trials[offset:offset + limit],
                "trials_page": {"offset": offset, "limit": limit, "total": len(trials)}}
    return {**task, "trials_page": page}
