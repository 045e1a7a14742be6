"""CURVE on the real broker: encrypted, authenticated, and roles kept apart (a client key cannot work,
a worker key cannot submit, plaintext gets nothing)."""

from __future__ import annotations


import asyncio

import pytest

from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient
from nsd.client.errors import BrokerRefused
from nsd.security import ClientKeys, HandshakeWatch, generate_keypair
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, done, metrics_answer, spec


def client_as(broker, secret, server_public, **kw) -> AsyncClient:
    return AsyncClient(broker.endpoints["clients"], timeout_s=kw.pop("timeout_s", 2), idle_resnapshot_s=0.3,
                       curve_key=secret, server_key=server_public, **kw)


async def test_allowed_keys_run_a_task_end_to_end(secure):
    broker, secret, server = secure
    client = client_as(broker, secret["alice"], server, timeout_s=10)
    worker = await ScriptedWorker(broker.endpoints["workers"], "node1", slots=2, delay_s=0.3, curve=ClientKeys.load(
        secret["node1"], server), answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    try:
        task_id = await client.submit(spec())
        events = [e async for e in client.events(task_id)]  # the XPUB socket is CURVE too
        assert any(e["kind"] == "trial" for e in events), events  # streamed, not only snapshots
        assert (await done(client, task_id))["winner"]["index"] == 1
    finally:
        await worker.stop()
        await client.close()


@pytest.mark.parametrize("who, why", [("node1", "the broker refused this client's CURVE key"),
                                      ("mallory", "the broker refused this client's CURVE key"),
                                      (None, "the broker refused a connection without CURVE")])
async def test_a_worker_key_an_unknown_key_and_plaintext_cannot_use_the_client_socket(secure, who, why):
    """Refused at the handshake, and told so at once: not a timeout that blames the network."""
    broker, secret, server = secure
    client = client_as(broker, secret[who], server, timeout_s=30) if who else \
        AsyncClient(broker.endpoints["clients"], timeout_s=30)
    try:
        for _ in range(2):  # and again on a fresh connection
            with pytest.raises(BrokerRefused, match=why):
                await client.hello()
    finally:
        await client.close()


@pytest.mark.parametrize("who", ["alice", "mallory"])
async def test_a_client_key_or_an_unknown_key_cannot_register_as_a_worker(secure, who):
    broker, secret, server = secure
    worker = ScriptedWorker(broker.endpoints["workers"], "intruder", slots=4, curve=ClientKeys.load(secret[who], server))
    watch = HandshakeWatch(worker.sock, "worker")  # before connecting: the one refusal must be seen
    await worker.start(wait=False)
    try:
        refused = await wait_for(watch.problem, 10)  # the handshake itself is refused...
        assert "refused this worker's CURVE key" in refused
        assert not worker.registered.is_set() and broker.workers == {}  # ...so nothing registered
    finally:
        watch.close()
        await worker.stop()


def test_curve_allows_binding_beyond_loopback(tmp_path):
    made = generate_keypair(tmp_path, "broker")
    Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://0.0.0.0:5550", curve_secret=made[1]))  # no error: CURVE protects it
    with pytest.raises(ValueError, match="--curve-secret"):
        Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://0.0.0.0:5550"))


async def test_a_worker_with_a_key_the_broker_refuses_says_so(secure, tmp_path):
    """A worker's refused handshake ends its connection at once and reads as the refusal, not as a broker
    that went quiet (one session, driven directly: no runner is needed to see it)."""
    from nsd.worker.daemon import WorkerConfig, WorkerDaemon

    broker, secret, server = secure
    daemon = WorkerDaemon(WorkerConfig(broker=broker.endpoints["workers"], cpus=[0], cache_dir=tmp_path / "w",
                                       worker_id="intruder", curve_key=secret["mallory"], server_key=server))
    try:
        registered = await asyncio.wait_for(daemon._session(), 30)
        assert registered is False and "the broker refused this worker's CURVE key" in daemon.refused
        assert "nsd keys allow --role worker" in daemon.refused and broker.workers == {}
    finally:
        daemon.ctx.term()
