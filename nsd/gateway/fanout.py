"""The event door: one broker subscription per followed task, fanned out to every stream that watches it.

Each stream used to run its own Clone loop (a SUB socket, and a whole-task STATUS on every quiet spell):
300 streams on a 20,000-trial task were 300 copies of the task a few seconds apart, through one locked
connection. Now a `Feed` per (tenant, task) follows the broker (zguide Clone: subscribe, snapshot, events
in seq order, a new snapshot on a gap) and folds the events into the one view it keeps. On a quiet spell
it asks only for the task's seq (a page of no trials), and reads the whole task again only when the seq
moved. A stream that joins, or that reads too slowly to keep up with its small queue, catches up from
the feed's latest snapshot and the few events after it (one snapshot, serialised once, shared by every
stream that needs it; a newer one only after SINCE events) in place of what it missed: no stream can
make the gateway buffer for it, and ids still only grow. Streams are capped per token and overall.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import zmq

from nsd.client.errors import BrokerUnavailable
from nsd.client.view import fold_event
from nsd.gateway.broker import ACTING, BrokerPool
from nsd.net import configure, connectable
from nsd.protocol import Cmd, ProtocolError, unpack
from nsd.states import TaskState

log = logging.getLogger("nsd.gateway")
QUEUE = 64  # events a stream may be behind (beyond its catch-up) before it catches up from a snapshot instead
SINCE = 64  # events kept after the feed's latest snapshot: a newer snapshot is made only after this many


class TooManyStreams(RuntimeError):
    pass


class SharedEvent(dict):
    """An event every stream of a feed sends: serialised once (and framed once per door), whoever asks
    first, instead of once per stream. Never changed after it is made."""

    @classmethod
    def snapshot(cls, task_id: str, view: dict[str, Any]) -> SharedEvent:
        """The view as a snapshot event, serialised now (the view changes after): its `task` is parsed back
        from that text only for a door that reads it (the old /task/screen), a fresh copy each time."""
        event = cls(kind="snapshot", task_id=task_id, seq=view["seq"])
        event.cached("json", lambda: json.dumps({**event, "task": view}, separators=(",", ":"), sort_keys=True))
        return event

    def __missing__(self, key: str):
        if key == "task" and self.get("kind") == "snapshot":
            return json.loads(self.text())["task"]
        raise KeyError(key)

    def text(self) -> str:
        return self.cached("json", lambda: json.dumps(self, separators=(",", ":"), sort_keys=True))

    def cached(self, kind: str, make):
        forms = self.__dict__.setdefault("_forms", {})
        if kind not in forms:
            forms[kind] = make()
        return forms[kind]


def event_json(event: dict[str, Any]) -> str:
    """An event as the doors send it (SSE data, gRPC Event.json)."""
    return event.text() if isinstance(event, SharedEvent) else json.dumps(event, separators=(",", ":"), sort_keys=True)


class Subscription:
    """One stream's place in a feed: a short queue of events, or `lagging` (it catches up from the
    feed's latest snapshot and the events since)."""

    def __init__(self, feed: Feed):
        self.feed = feed
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.lagging = True  # a new stream starts from the feed's view
        self.wake = asyncio.Event()

    def offer(self, event: dict[str, Any]) -> None:
        if not self.lagging:
            if len(self.queue) >= QUEUE + SINCE:
                self.lagging = True
                self.queue.clear()
            else:
                self.queue.append(event)
        self.wake.set()

    async def next(self) -> dict[str, Any] | None:
        """The next event; None after the last one (the task ended). A feed's error is raised here."""
        while True:
            if self.lagging and self.feed.view is not None:
                self.lagging = False
                self.queue = collections.deque(self.feed.catch_up())
            if self.queue:
                return self.queue.popleft()
            if self.feed.ended:
                if self.feed.error is not None:
                    raise self.feed.error
                return None
            self.wake.clear()
            await self.wake.wait()


class Feed:
    """A task followed at the broker for all the streams that watch it."""

    def __init__(self, pool: BrokerPool, tenant: str, task_id: str, idle_s: float, reconnect_s: float):
        self.pool, self.task_id, self.idle_s, self.reconnect_s = pool, task_id, idle_s, reconnect_s
        self.subscriptions: set[Subscription] = set()
        self.view: dict[str, Any] | None = None
        self.ended, self.error = False, None
        self.resnapshots = 0  # whole views read after the first (a gap, or the seq moved while quiet)
        self.snapshots = 0  # snapshot events made (at most one per SINCE events, however many streams join)
        self._snapshot: SharedEvent | None = None
        self._since: list[SharedEvent] = []  # the events after the snapshot, in order
        context = contextvars.copy_context()
        context.run(ACTING.set, tenant)  # the feed's requests are the tenant's, as the stream's are
        self.task = asyncio.get_running_loop().create_task(self._run(), context=context)

    def catch_up(self) -> list[SharedEvent]:
        """What a joining or lagging stream is sent: the latest snapshot and the events after it. A new
        snapshot is made only when none is kept (a stream after SINCE events, or a whole read): streams
        that join or fall behind at different moments share one, not one each (a 20,000-trial snapshot is
        megabytes)."""
        if self._snapshot is None:
            self._snapshot, self._since = SharedEvent.snapshot(self.task_id, self.view), []
            self.snapshots += 1
        return [self._snapshot, *self._since]

    def _reset(self, view: dict[str, Any]) -> None:
        """A whole view stands in for whatever came before: every stream gets it as a snapshot next."""
        self.view, self._snapshot, self._since = view, None, []
        for subscription in self.subscriptions:
            subscription.lagging = True
            subscription.queue.clear()
            subscription.wake.set()

    def _publish(self, event: dict[str, Any]) -> None:
        fold_event(self.view, event)
        shared = SharedEvent(event)
        self._since.append(shared)
        if len(self._since) > SINCE:  # the next stream to catch up gets a newer snapshot instead
            self._snapshot, self._since = None, []
        for subscription in self.subscriptions:
            subscription.offer(shared)

    async def _run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to every stream, which ends with it
            log.info("gateway: following task %s ended: %s", self.task_id, exc)
            self.error = exc
        finally:
            self.ended = True
            for subscription in self.subscriptions:
                subscription.wake.set()

    async def _follow(self) -> None:
        sub = configure(self.pool.ctx.socket(zmq.SUB))
        heard: set[str] = set()
        try:
            self.pool.secure(sub)
            await self._hear(sub, heard)
            sub.subscribe(self.task_id.encode())
            self._reset(await self.pool.whole(self.task_id))
            while not TaskState(self.view["state"]).terminal:
                event = await self._next_event(sub)
                if event is not None and event["seq"] <= self.view["seq"]:
                    continue  # older than the view
                if event is not None and event["seq"] == self.view["seq"] + 1:
                    self._publish(event)
                    continue
                # A gap, or a quiet spell that may hide a missed final event: ask only for the seq.
                probe = await self._probe()
                if probe["seq"] > self.view["seq"]:
                    self.resnapshots += 1
                    self._reset(await self.pool.whole(self.task_id))
                    await self._hear(sub, heard)  # a broker pair that failed over: hear the one serving now
        finally:
            sub.close(linger=0)

    async def _hear(self, sub: zmq.Socket, heard: set[str]) -> None:
        """Connect to the events of the broker that answers (the serving one of a pair), unless heard already."""
        events = (await self.pool.hello())["events"]
        if events not in heard:
            heard.add(events)
            sub.connect(connectable(events, urlsplit(self.pool.broker).hostname))

    async def _next_event(self, sub: zmq.Socket) -> dict[str, Any] | None:
        if not await sub.poll(timeout=int(self.idle_s * 1000)):
            return None
        frames = await sub.recv_multipart()
        try:
            event = unpack(frames[1:], frozenset({Cmd.EVENT})).body
        except ProtocolError:
            return None
        return event if frames[0] == self.task_id.encode() else None

    async def _probe(self) -> dict[str, Any]:
        """The task's seq and state (a page of no trials), riding out a broker restart for `reconnect_s`."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.reconnect_s
        while True:
            try:
                return await self.pool.page(self.task_id, 0, 0, Cmd.STATUS)
            except BrokerUnavailable:
                if loop.time() > give_up:
                    raise
                await asyncio.sleep(min(1.0, self.idle_s))


class Feeds:
    """Every followed task's feed, and the caps on streams: per token (name) and overall."""

    def __init__(self, pool: BrokerPool, max_streams: int = 1024, max_per_token: int = 32,
                 idle_s: float = 2.0, reconnect_s: float = 300.0):
        self.pool, self.max_streams, self.max_per_token = pool, max_streams, max_per_token
        self.idle_s, self.reconnect_s = idle_s, reconnect_s
        self.feeds: dict[tuple[str, str], Feed] = {}
        self.streams: collections.Counter[str] = collections.Counter()

    def check(self, token: str) -> None:
        """Refuse (TooManyStreams) a stream the caps leave no room for."""
        if sum(self.streams.values()) >= self.max_streams:
            raise TooManyStreams(f"the gateway serves at most {self.max_streams} event streams at once; "
                                 "try again later")
        if self.streams[token] >= self.max_per_token:
            raise TooManyStreams(f"this token has {self.streams[token]} event streams open, the most it may; "
                                 "close one first")

    @contextlib.contextmanager
    def subscribe(self, token: str, tenant: str, task_id: str):
        """A subscription to the (tenant, task) feed, started if none runs; counted against the caps."""
        self.check(token)
        key = (tenant, task_id)  # never shared across tenants: a feed reads as its tenant
        feed = self.feeds.get(key)
        if feed is None or feed.error is not None:
            feed = self.feeds[key] = Feed(self.pool, tenant, task_id, self.idle_s, self.reconnect_s)
        subscription = Subscription(feed)
        feed.subscriptions.add(subscription)
        self.streams[token] += 1
        try:
            yield subscription
        finally:
            self.streams[token] -= 1
            if not self.streams[token]:
                del self.streams[token]
            feed.subscriptions.discard(subscription)
            if not feed.subscriptions and self.feeds.get(key) is feed:
                del self.feeds[key]
                feed.task.cancel()

    async def close(self) -> None:
        feeds, self.feeds = list(self.feeds.values()), {}
        for feed in feeds:
            feed.task.cancel()
        for feed in feeds:
            with contextlib.suppress(asyncio.CancelledError):
                await feed.task
