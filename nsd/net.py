"""Small socket helpers shared by the daemons and the client (pyzmq only, no torch)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import zmq

from nsd.protocol import MAX_MESSAGE_BYTES


def configure(sock: zmq.Socket, *, linger_ms: int = 0, sndtimeo_ms: int = 1000) -> zmq.Socket:
    """The options every nsd socket carries (docs/design.md: explicit LINGER, SNDTIMEO, MAXMSGSIZE)."""
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDTIMEO, sndtimeo_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
    return sock


def send_now(sock: zmq.Socket, frames: list[bytes]) -> bool:
    """Send without waiting; False if it cannot go now (peer gone, queue full). An asyncio socket reports
    such errors on the future it returns, not by raising: read them there, so none goes unretrieved."""
    try:
        sent = sock.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.ZMQError:
        return False
    if isinstance(sent, asyncio.Future):
        if not sent.done():
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())
            return True
        return not sent.cancelled() and sent.exception() is None
    return True


class Readable:
    """Wait until a socket has a message, by watching libzmq's notification descriptor from the event
    loop. A lone message (an idle worker's heartbeat) then costs one wake-up and non-blocking reads of
    a synchronous socket, not pyzmq's asyncio future machinery, which was most of an idle broker's time.

    libzmq's descriptor only says "look at ZMQ_EVENTS", and any call on the socket may consume that
    signal, including our own sends: whoever sends on the socket calls `poke()` so the waiter looks
    again instead of sleeping on a message that is already there.
    """

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.fd = sock.getsockopt(zmq.FD)
        self.loop = asyncio.get_running_loop()
        self._woken = asyncio.Event()
        self.loop.add_reader(self.fd, self._signalled)

    def _signalled(self) -> None:
        # Reading ZMQ_EVENTS consumes the descriptor's signal; unread, it stays readable and the loop
        # calls us again at every turn while our reader is busy or gathering.
        self.sock.getsockopt(zmq.EVENTS)
        self._woken.set()

    def poke(self) -> None:
        self._woken.set()

    async def gather(self, seconds: float) -> None:
        """Sleep, not woken by what arrives meanwhile: each message from another peer would signal the
        descriptor again, and the loop call us for each, gathering or not."""
        self.loop.remove_reader(self.fd)
        try:
            await asyncio.sleep(seconds)
        finally:
            if not self.sock.closed:
                self.loop.add_reader(self.fd, self._signalled)
            self._woken.set()

    async def wait(self) -> None:
        while not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._woken.clear()
            await self._woken.wait()

    def close(self) -> None:
        self.loop.remove_reader(self.fd)


_MORE_NOW, _NOW = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)


def send_frames_now(sock: zmq.Socket, frames: list[bytes]) -> bool:
    """`send_now` for a synchronous socket: frame by frame with plain-int flags, since pyzmq's
    send_multipart builds an enum flag for every frame (a third of an idle broker's sending time).
    A ROUTER refuses a message at its first frame (peer gone, queue full), so none goes out in part."""
    try:
        for frame in frames[:-1]:
            sock.send(frame, _MORE_NOW)
        sock.send(frames[-1], _NOW)
    except zmq.ZMQError:
        return False
    return True


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints and tcp:// on a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: reachable from outside


def connectable(bound: str, peer_host: str | None = None) -> str:
    """An endpoint a peer can connect to for one this side bound (a wildcard host becomes the peer's)."""
    if bound.startswith("tcp://"):
        parts = urlsplit(bound)
        if parts.hostname in ("0.0.0.0", "::", "*"):
            return f"tcp://{peer_host or socket.gethostname()}:{parts.port}"
    return bound


def install_uvloop() -> None:
    """Use uvloop where it is installed; asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class OncePerPeer:
    """Logs a peer's first bad message and counts the rest, so a flood cannot fill the log."""

    def __init__(self, log: logging.Logger, limit: int = 10_000):
        self.log, self.limit, self.count, self._seen = log, limit, 0, set()

    def __call__(self, peer: bytes, what: str) -> None:
        self.count += 1
        if peer not in self._seen and len(self._seen) < self.limit:
            self._seen.add(peer)
            self.log.warning("dropped a bad message from peer %s: %s (later ones are only counted)",
                             peer.hex()[:16] or "?", what)
