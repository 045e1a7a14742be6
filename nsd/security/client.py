"""The worker's and client's side of CURVE: their key pair and the broker's public key, and what a failed
handshake means in words."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from nsd.security.keys import PUBLIC_SUFFIX, read_certificate, read_secret_certificate

log = logging.getLogger("nsd.security")


@dataclass(frozen=True)
class ClientKeys:
    """A worker's or client's key pair and the broker's public key, loaded once."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_cert: Path, server_public: Path) -> ClientKeys:
        public, secret = read_secret_certificate(secret_cert, "connecting with CURVE")
        server, server_secret = read_certificate(server_public)
        if server_secret is not None:
            log.warning("%s holds the broker's SECRET key; clients and workers need only its public %s file",
                        server_public, PUBLIC_SUFFIX)
        return cls(public, secret, server)

    def apply(self, sock: zmq.Socket) -> zmq.Socket:
        """Make sock a CURVE client of the broker; call before sock.connect."""
        if sock.getsockopt(zmq.LAST_ENDPOINT):
            raise RuntimeError("apply CURVE before connect: the socket is connected already")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server
        return sock


def apply_client(sock: zmq.Socket, secret_cert: Path, server_public: Path) -> zmq.Socket:
    """One-shot `ClientKeys.load(secret_cert, server_public).apply(sock)`."""
    return ClientKeys.load(secret_cert, server_public).apply(sock)


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeWatch:
    """Why a connecting asyncio socket has no broker: turns a silent timeout into an actionable line.

    Attach before connect (a refused key is not retried, so its one failure must be seen); ask
    `await watch.problem()` (or `take()`, then `last`) when no answer comes; `close()` before closing the
    socket. A socket has one monitor: `also` adds events its owner wants to count (`take()` returns how
    many came), e.g. the client's EVENT_DISCONNECTED; `monitor` is there to poll.
    """

    def __init__(self, sock: zmq.asyncio.Socket, role: str = "client", also: int = 0):
        self.role = role
        self._sock = sock
        self.monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS | also)
        self._events = zmq.Socket.shadow(self.monitor.underlying)  # plain, non-blocking reads
        self.last: str | None = None  # the latest handshake failure as a sentence (None: none, or a success since)

    def take(self) -> int:
        """Read what the monitor holds now, without waiting: note each handshake's outcome in `last`, and
        return how many of the `also` events came."""
        others = 0
        while True:
            try:
                event = parse_monitor_message(self._events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return others
            if event["event"] & _HANDSHAKE_EVENTS:
                self.last = self._describe(event["event"], event["value"])
            else:
                others += 1

    async def problem(self) -> str | None:
        """The latest handshake failure as a sentence, or None (none yet, or a success since)."""
        self.take()
        return self.last

    def _describe(self, event: int, value: int) -> str | None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the broker refused this {self.role}'s CURVE key (ZAP status {value}): add its public "
                    f".key file to the broker with `nsd keys allow --role {self.role} FILE.key`")
        # Which side notices a mechanism mismatch first is a race: go by our own mechanism instead.
        if self._sock.getsockopt(zmq.MECHANISM) != zmq.CURVE:
            return (f"the broker refused a connection without CURVE: it requires keys; give this {self.role} "
                    f"its .key_secret file and the broker's public .key file")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return f"the broker does not use CURVE, but this {self.role} was given keys"
        return ("the CURVE handshake with the broker failed: check that the server key given to this "
                f"{self.role} is the broker's public key (its .key file), and that the broker uses CURVE")

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self.monitor.close(linger=0)
