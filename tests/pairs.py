"""Helpers the broker pair's tests share (issue 20): two brokers of a pair in this process on steady
loopback ports, and a cuttable TCP link between them."""

from __future__ import annotations

import asyncio

from tests.conftest import wait_for


def steady_port() -> int:
    """A free loopback port below the kernel's ephemeral range: one that a broker binds again after a
    restart, and that no outgoing connection (ZeroMQ reconnecting to a stopped peer) can be given meanwhile."""
    import random
    import socket
    from pathlib import Path

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Link:
    """A TCP forwarder in front of one broker's peer socket that a test can cut — nothing crosses either way
    any more, as with a pulled cable, while the connections stay open — and heal (the cut connections are
    closed, so both ends reconnect)."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, steady_port()
        self.is_cut = False
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        if self.is_cut:
            return  # held open, never forwarded, until heal() closes it
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()
            self.writers.discard(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            if not self.is_cut:  # cut: what arrives is lost, as on a dead wire
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        self.is_cut = True

    def heal(self) -> None:
        self.is_cut = False
        for w in list(self.writers):
            w.close()
        self.writers.clear()

    async def close(self) -> None:
        self.heal()
        self.server.close()
        await self.server.wait_closed()


class PairOfBrokers:
    """The two brokers of a pair in this process, on fixed loopback ports (a broker restarts where it was);
    `kill` stops one at once, which its peer, workers and clients see as a broker that went silent. With
    `links`, their peer link runs through two `Link`s the test can cut."""

    def __init__(self, tmp_path, heartbeat_s: float = 0.25, liveness: int = 8, links: bool = False, **config):
        self.tmp, self.heartbeat_s, self.liveness, self.extra = tmp_path, heartbeat_s, liveness, config
        self.ports = {role: {s: steady_port() for s in ("clients", "workers", "events", "peer")}
                      for role in ("primary", "backup")}
        self.brokers: dict = {}
        # links[role]: what `role` connects to, in front of the other broker's peer socket
        self.links = {role: Link(self.ports[other]["peer"]) for role, other in
                      (("primary", "backup"), ("backup", "primary"))} if links else {}

    @property
    def window_s(self) -> float:
        return self.heartbeat_s * self.liveness

    def cut(self) -> None:
        for link in self.links.values():
            link.cut()

    def heal(self) -> None:
        for link in self.links.values():
            link.heal()

    def address(self, role: str, sock: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[role][sock]}"

    def both(self, sock: str) -> str:
        """The endpoint list clients and workers are given: `tcp://a,tcp://b`."""
        return ",".join(self.address(role, sock) for role in ("primary", "backup"))

    def config(self, role: str):
        from nsd.broker.config import BrokerConfig

        other = "backup" if role == "primary" else "primary"
        peer = f"tcp://127.0.0.1:{self.links[role].port}" if self.links else self.address(other, "peer")
        return BrokerConfig(state_dir=self.tmp / role, **{s: self.address(role, s) for s in ("clients", "workers", "events")},
                            peer=peer, peer_bind=self.address(role, "peer"), role=role,
                            heartbeat_s=self.heartbeat_s, liveness=self.liveness, **self.extra)

    async def start(self, role: str):
        from nsd.broker.daemon import Broker

        for link in self.links.values():
            if link.server is None:
                await link.start()
        broker = Broker(self.config(role))
        await broker.start()
        self.brokers[role] = broker
        return broker

    async def start_both(self) -> tuple:
        """Both brokers, settled: the primary active, the backup's copy whole."""
        brokers = await self.start("primary"), await self.start("backup")
        await self.settled("primary")
        return brokers

    async def kill(self, role: str) -> None:
        await self.brokers.pop(role).stop()

    def states(self) -> dict[str, str]:
        return {role: b.pair.state.value for role, b in self.brokers.items()}

    def active(self) -> list[str]:
        """The brokers that acknowledge work now (active or solo): never more than one."""
        return [role for role, b in self.brokers.items() if b.pair.state.value in ("active", "solo")]

    async def watch_active(self, seconds: float, seen: list) -> None:
        """Sample `active()` every 20 ms for `seconds`, appending each sample to `seen`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            seen.append(tuple(self.active()))
            await asyncio.sleep(0.02)

    async def settled(self, serving: str = "primary", timeout: float = 20) -> None:
        """`serving` is active and the other one's copy is whole."""
        async def ready():
            other = [b for role, b in self.brokers.items() if role != serving]
            return self.brokers[serving].pair.state.value == "active" and all(
                b.pair.state.value == "passive" and b.pair.whole for b in other)
        await wait_for(ready, timeout)

    async def close(self) -> None:
        for role in list(self.brokers):
            await self.kill(role)
        for link in self.links.values():
            if link.server is not None:
                await link.close()
