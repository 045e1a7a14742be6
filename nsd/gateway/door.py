"""The HTTP door's connection limits, which uvicorn lacks: a deadline on reading each request's head, and a
cap on connections per client address (README "Keeping the door open").

Without them 1,000 connections that each sent a header byte every 10 s held every slot (uvicorn's
`limit_concurrency` counts them: everyone else got 503) and nearly every descriptor, without a token. Now
a connection must deliver each request head within `header_timeout_s` (its first byte to its blank line),
and one address (an IPv6 /64) holds at most `per_client` connections: past that, a new one is closed at
once. A slow body is the app's to bound (it gives a stalled body up, app.paced).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
from dataclasses import dataclass, field

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def client_key(address: str | None) -> str:
    """Whose connection this is, for the per-client cap: the IPv4 address, or the IPv6 /64 (one host
    holds a whole /64, and could otherwise open each connection from a new address)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "?"
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


@dataclass
class DoorLimits:
    header_timeout_s: float = 10.0
    per_client: int = 128
    open: collections.Counter = field(default_factory=collections.Counter)  # connections per client key
    refused: int = 0  # connections closed at once (over the per-client cap)
    timed_out: int = 0  # connections closed for a request head not read in time

    def admit(self, key: str) -> bool:
        if self.open[key] >= self.per_client:
            self.refused += 1
            return False
        self.open[key] += 1
        return True

    def release(self, key: str) -> None:
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]


def guarded_protocol(limits: DoorLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the door's limits (passed as uvicorn.Config(http=...))."""

    class GuardedH11Protocol(H11Protocol):
        _key: str | None = None
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            key = client_key(self.client[0] if self.client else None)
            if not limits.admit(key):
                self.transport.abort()  # no answer: a client over its cap is not worth a write
                return
            self._key = key
            self._arm()

        def _arm(self) -> None:
            self._head_deadline = self.loop.call_later(limits.header_timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing():
                limits.timed_out += 1
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            scope = self.scope
            super().data_received(data)
            if self.transport.get_protocol() is not self:  # upgraded to a WebSocket: its protocol's now
                self._disarm()
                self._release()
            elif self.scope is not scope:
                self._disarm()  # a request head was read in full
            elif (self._head_deadline is None and self.conn.their_state is h11.IDLE
                  and not self.transport.is_closing()):
                self._arm()  # the first bytes of another request on this connection: its head is timed too

        def _release(self) -> None:
            if self._key is not None:
                limits.release(self._key)
                self._key = None

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._release()
            super().connection_lost(exc)

    return GuardedH11Protocol
