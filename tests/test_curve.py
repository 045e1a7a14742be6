"""CURVE on the real broker: encrypted, authenticated, and roles kept apart (a client key cannot work,
a worker key cannot submit, plaintext gets nothing)."""

from __future__ import annotations


import pytest

from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient, BrokerUnavailable
from nsd.security import ClientKeys, HandshakeWatch, allow, generate_keypair
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, done, metrics_answer, spec


@pytest.fixture
async def secure(tmp_path):
    keys = tmp_path / "keys"
    made = {name: generate_keypair(tmp_path / "made", name) for name in ("broker", "alice", "node1", "mallory")}
    allow(keys, "client", made["alice"][0], code=True)  # its tasks run a python recipe
    allow(keys, "worker", made["node1"][0])
    broker = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                    events="tcp://127.0.0.1:*", curve_secret=made["broker"][1], keys_dir=keys, heartbeat_s=0.5))
    await broker.start()
    yield broker, {name: secret for name, (_, secret) in made.items()}, made["broker"][0]
    await broker.stop()


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


@pytest.mark.parametrize("who", ["node1", "mallory", None])
async def test_a_worker_key_an_unknown_key_and_plaintext_cannot_use_the_client_socket(secure, who):
    broker, secret, server = secure
    client = client_as(broker, secret[who], server) if who else AsyncClient(broker.endpoints["clients"], timeout_s=2)
    try:
        with pytest.raises(BrokerUnavailable):
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
