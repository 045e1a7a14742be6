"""The task event stream, the zguide's Clone pattern: subscribe first, then take a snapshot with its
`seq`, drop older events, and take a new snapshot on a gap or a quiet spell, so an `events()` stream
never misses a change, however the subscription and snapshot race; it rides out a broker restart.

A part of `AsyncClient` (nsd/client/api.py), which supplies the context, the keys and `status`/`hello`."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import zmq

from nsd.client.errors import BrokerUnavailable
from nsd.net import configure, connectable
from nsd.protocol import Cmd, ProtocolError, unpack
from nsd.states import TaskState


class EventStream:
    """AsyncClient's `events()`."""

    async def events(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        """A snapshot event (`kind == "snapshot"`, with the whole task), then every later event in seq
        order; a new snapshot whenever events were missed. Ends after the task's final state."""
        task_id = (await self.status(task_id))["task_id"]  # a unique prefix becomes the full id
        sub = configure(self.ctx.socket(zmq.SUB))
        try:
            if self._curve is not None:
                self._curve.apply(sub)
            heard: set[str] = set()
            await self._hear_events(sub, heard)
            sub.subscribe(task_id.encode())
            snapshot = await self.status(task_id)
            seq = snapshot["seq"]
            yield {"kind": "snapshot", "task_id": task_id, "seq": seq, "task": snapshot}
            if TaskState(snapshot["state"]).terminal:
                return
            while True:
                if await sub.poll(timeout=int(self.idle_resnapshot_s * 1000)):
                    frames = await sub.recv_multipart()
                    try:
                        event = unpack(frames[1:], frozenset({Cmd.EVENT})).body
                    except ProtocolError:
                        continue
                    if frames[0] != task_id.encode() or event["seq"] <= seq:
                        continue
                    if event["seq"] == seq + 1:
                        seq = event["seq"]
                        yield event
                        if event["kind"] == "state" and TaskState(event["state"]).terminal:
                            return
                        continue
                # A gap, or a quiet spell that may hide a missed final event: take a new snapshot.
                snapshot = await self._status_patiently(task_id)
                await self._hear_events(sub, heard)  # after a failover: the events of the broker that serves now
                if snapshot["seq"] > seq:
                    seq = snapshot["seq"]
                    yield {"kind": "snapshot", "task_id": task_id, "seq": seq, "task": snapshot}
                if TaskState(snapshot["state"]).terminal:
                    return
        finally:
            sub.close(linger=0)


    async def _hear_events(self, sub: zmq.asyncio.Socket, heard: set[str]) -> None:
        """Connect `sub` to the events of the broker we talk to now, unless it is connected already (a SUB
        hears both brokers of a pair; only the serving one publishes)."""
        while self.broker not in heard:
            broker = self.broker
            if broker not in self._events_endpoints:
                events = (await self.hello())["events"]
                if self.broker != broker:
                    continue  # the HELLO itself moved us to the other broker
                self._events_endpoints[broker] = connectable(events, _host(broker))
            sub.connect(self._events_endpoints[broker])
            heard.add(broker)

    async def _status_patiently(self, task_id: str) -> dict[str, Any]:
        """STATUS, riding out a broker restart for up to `reconnect_s` (the SUB socket reconnects by itself)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.reconnect_s
        while True:
            try:
                return await self.status(task_id)
            except BrokerUnavailable:
                if loop.time() > give_up:
                    raise
                await asyncio.sleep(min(1.0, self.idle_resnapshot_s))


def _host(address: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(address).hostname if address.startswith("tcp://") else None
