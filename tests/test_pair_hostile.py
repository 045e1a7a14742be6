"""The pair's link trusts nothing from the wire (issue 20): only the configured peer is heard (its identity
and address; under CURVE, the pair's own key), every message is checked by nsd/protocol.py, and a record
that does not fit this broker's schema changes nothing."""

from __future__ import annotations

import asyncio
import sqlite3

import msgpack
import pytest
import zmq
import zmq.asyncio

from nsd.client.api import AsyncClient
from nsd.net import configure
from nsd.protocol import PEER_TO_PEER, PROTOCOL_VERSION, Cmd, pack, unpack
from nsd.security import ClientKeys, allow, generate_keypair
from tests.conftest import wait_for
from tests.pairs import PairOfBrokers
from tests.peers import ScriptedWorker, done, metrics_answer, spec


@pytest.fixture
async def pair(tmp_path):
    brokers = PairOfBrokers(tmp_path)
    yield brokers
    await brokers.close()


class Intruder:
    """A DEALER on a broker's pair socket, sending whatever a test gives it."""

    def __init__(self, endpoint: str, identity: bytes, curve: ClientKeys | None = None):
        self.ctx = zmq.asyncio.Context()
        self.sock = configure(self.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a connection the broker let in
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(endpoint)

    async def send(self, frames: list[bytes]) -> bool:
        """False when it cannot even be queued: no connection was let in."""
        try:
            await self.sock.send_multipart(frames)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def peer_state(broker, **override) -> list[bytes]:
    body = {"role": "backup", "state": "solo", "epoch": 99, "lsn": 1000, "caught_up": True, "workers": 0,
            "version": PROTOCOL_VERSION, "schema": broker.pair.schema, "hears_you": True, **override}
    return pack(Cmd.PEER_STATE, body)


async def test_only_the_configured_peer_is_heard_and_every_message_is_checked(pair):
    primary = await pair.start("primary")  # alone: pending, waiting for its backup
    endpoint = pair.address("primary", "peer")
    strangers = [Intruder(endpoint, b"mallory"), Intruder(endpoint, b"backup"), Intruder(endpoint, b"big")]
    try:
        # over the message limit: libzmq drops the connection before anything reads it
        await strangers[2].send([b"NSD1", bytes([Cmd.PEER_TX]), b"\x00" * (17 << 20)])
        await strangers[0].send(peer_state(primary))  # a valid state, from something that is not the backup
        for frames in (peer_state(primary, role="primary"),  # a second primary
                       peer_state(primary, schema="0" * 16),  # another nsd version
                       [b"XXXX", b"\x51", b"\x80"], [b"NSD1", b"\x7f", b"\x80"],  # not nsd's / unknown type
                       pack(Cmd.PEER_TX, {"epoch": 1, "lsn": 1, "part": 0, "last": True, "tables": {"tasks": ["id"]},
                                          "rows": [["tasks; DROP TABLE tasks", 1, None]]}),
                       pack(Cmd.PEER_STATE, {"role": "backup", "state": "emperor"}),
                       [b"NSD1", bytes([Cmd.PEER_STATE]), msgpack.packb([1, 2, 3])]):
            await strangers[1].send(frames)
        await wait_for(lambda: _counted(primary, 8), 10)
        await asyncio.sleep(3 * pair.heartbeat_s)  # and nothing else came of it
        assert primary.pair.state.value == "pending" and primary.pair.peer is None and primary.pair.epoch == 0
        db = sqlite3.connect(pair.tmp / "primary" / "nsd.sqlite3")
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
        db.close()
    finally:
        for intruder in strangers:
            intruder.close()


async def _counted(broker, n: int) -> bool:
    return broker.pair._bad.count >= n


async def test_a_record_that_does_not_fit_changes_nothing_and_the_copy_asks_for_a_snapshot(pair):
    backup = await pair.start("backup")
    ctx = zmq.asyncio.Context()
    listener = configure(ctx.socket(zmq.ROUTER))  # where the backup's DEALER sends its state
    listener.bind(pair.address("primary", "peer"))
    fake = Intruder(pair.address("backup", "peer"), b"primary")  # the configured peer's name and address
    try:
        await fake.send(peer_state(backup, role="primary", epoch=1, lsn=0))
        await wait_for(lambda: _state(backup, "passive"), 10)
        cols = backup.pair.copy.applier.tables["tasks"]
        for body in ({"lsn": 5, "rows": [["tasks", 1, [None] * len(cols)]]},  # a gap: ignored
                     {"lsn": 1, "tables": {"tasks": cols + ["extra"]}, "rows": [["tasks", 1, [None] * (len(cols) + 1)]]},
                     {"lsn": 1, "tables": {"secrets": ["x"]}, "rows": [["secrets", 1, ["x"]]]}):
            await fake.send(pack(Cmd.PEER_TX, {"epoch": 1, "part": 0, "last": True, "tables": {"tasks": cols}, **body}))
        await wait_for(lambda: _wants_snapshot(backup), 10)
        asked = unpack((await asyncio.wait_for(_next_state(listener), 10))[1:], PEER_TO_PEER).body
        assert asked["resync"] is True and asked["caught_up"] is False and asked["lsn"] == 0
        db = sqlite3.connect(pair.tmp / "backup" / "nsd.sqlite3")
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
        db.close()
    finally:
        fake.close()
        listener.close(linger=0)
        ctx.term()


async def _state(broker, state: str) -> bool:
    return broker.pair.state.value == state


async def _wants_snapshot(broker) -> bool:
    return broker.pair.copy.wants_snapshot


async def _next_state(listener) -> list[bytes]:
    while True:
        frames = await listener.recv_multipart()
        if frames[2] == bytes([Cmd.PEER_STATE]) and unpack(frames[1:], PEER_TO_PEER).body.get("resync"):
            return frames


async def test_under_curve_the_link_is_encrypted_and_only_the_pairs_key_reaches_it(tmp_path):
    made = {name: generate_keypair(tmp_path / "made", name) for name in ("broker", "alice", "node1")}
    keys = tmp_path / "keys"
    allow(keys, "client", made["alice"][0], code=True)  # its task runs a python recipe
    allow(keys, "worker", made["node1"][0])
    pair = PairOfBrokers(tmp_path, curve_secret=made["broker"][1], keys_dir=keys)
    await pair.start("primary")
    await pair.start("backup")
    client = AsyncClient(pair.both("clients"), timeout_s=5, curve_key=made["alice"][1], server_key=made["broker"][0])
    worker = None
    alice_on_the_link = Intruder(pair.address("primary", "peer"), b"backup",
                                 ClientKeys.load(made["alice"][1], made["broker"][0]))
    plaintext = Intruder(pair.address("primary", "peer"), b"backup")
    try:
        await pair.settled("primary")  # the two brokers found each other through CURVE, with the pair's key
        primary = pair.brokers["primary"]
        before = (primary.pair.peer_heard, primary.pair._bad.count)
        for intruder in (alice_on_the_link, plaintext):  # a client's key, and no key: ZAP lets neither in
            assert not await intruder.send(peer_state(primary, epoch=1000))
        worker = await ScriptedWorker(pair.address("primary", "workers"), "node1", slots=2, delay_s=0.05,
                                      answer=metrics_answer({i: 0.99 for i in range(6)}),
                                      curve=ClientKeys.load(made["node1"][1], made["broker"][0])).start()
        task = await done(client, await client.submit(spec()))
        assert task["winner"]["index"] == 0
        assert primary.pair.state.value == "active" and primary.pair.epoch == 1  # the forged epoch never arrived
        assert primary.pair._bad.count == before[1]  # refused at the handshake: not even a message
    finally:
        if worker is not None:
            await worker.stop()
        alice_on_the_link.close()
        plaintext.close()
        await client.close()
        await pair.close()
