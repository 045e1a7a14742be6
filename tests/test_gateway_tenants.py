"""Issue 16, the gateway's side: a token's name is its tenant, named on every request the gateway makes for
it; the `code` column is the right to submit python recipes; another tenant's task is answered as an
unknown one; DELETE and gRPC Delete. The wire is watched through a relay in front of the real broker."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest
import zmq
import zmq.asyncio

from nsd.protocol import Cmd
from tests.conftest import DIGITS, digits_spec
from tests.gateway_fixtures import BOB_TOKEN, upload_digits

pytest.importorskip("fastapi")
BOB = {"Authorization": f"Bearer {BOB_TOKEN}"}


@pytest.mark.parametrize("text, problem", [
    ("alice alice-token-0123456789abcdef admin\n", "expected `name token` or `name token code`"),
    ("alice alice-token-0123456789abcdef code extra\n", "expected"),
    ("al/ice alice-token-0123456789abcdef\n", "not a tenant name"),
    (".alice alice-token-0123456789abcdef\n", "not a tenant name"),
    ("alice short\n", "shorter than 16"),
    ("alice same-token-0123456789abcdef\nbob same-token-0123456789abcdef code\n", "also 'alice'"),
])
def test_a_malformed_token_file_is_refused_whole(tmp_path, text, problem):
    from nsd.gateway.auth import TokenFileError, read_tokens

    (tmp_path / "tokens").write_text(text)
    with pytest.raises(TokenFileError, match=problem):
        read_tokens(tmp_path / "tokens")


def test_token_lines_name_the_tenant_and_the_code_right(tmp_path):
    from nsd.gateway.auth import Caller, Tokens

    (tmp_path / "tokens").write_text("# comment\nalice alice-token-0123456789abcdef code\n\n"
                                     "alice@example.com second-token-0123456789ab\n")
    tokens = Tokens(tmp_path / "tokens")
    assert tokens.who("Bearer alice-token-0123456789abcdef") == Caller("alice", code=True)
    assert tokens.who("bearer second-token-0123456789ab") == Caller("alice@example.com", code=False)
    assert tokens.who("Bearer alice-token-0123456789abcdeX") is None and tokens.who(None) is None


async def test_a_token_without_code_cannot_submit_a_python_recipe(http, client, gateway):
    spec = await upload_digits(http)  # alice uploads; bob may name the blobs (one tenant without CURVE)
    refused = await http.post("/v1/tasks", json=spec, headers=BOB)
    assert refused.status_code == 403 and "may not submit python recipes" in refused.json()["error"]
    builtin = {"name": "b", "model": {"path": "/models/bert", "shared": True},
               "recipe": {"kind": "text-classification", "data": "/data/sst2.csv"}, "tuning": {"preset": "dynamic"}}
    assert (await http.post("/v1/tasks", json=builtin, headers=BOB)).status_code == 201  # built-in: no code
    assert (await http.post("/v1/tasks", json=spec)).status_code == 201  # alice's line says `code`
    assert [t["name"] for t in await client.list()] == ["b", spec["name"]]

    import grpc

    from nsd.gateway import nsd_pb2 as pb
    from nsd.gateway import nsd_pb2_grpc
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await nsd_pb2_grpc.NsdStub(channel).Submit(pb.SubmitRequest(spec_json=json.dumps(spec)),
                                                        metadata=(("authorization", f"Bearer {BOB_TOKEN}"),))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


class Relay:
    """A ZeroMQ relay in front of the real broker that keeps a copy of every request: a ROUTER for the
    gateway's connections, one DEALER to the broker per connection (the broker keys uploads by it)."""

    def __init__(self, broker_endpoint: str):
        self.broker, self.ctx = broker_endpoint, zmq.asyncio.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.backs: dict[bytes, zmq.asyncio.Socket] = {}
        self.requests: list[tuple[Cmd, dict]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.front, zmq.POLLIN)
        while True:
            for sock, _ in await poller.poll():
                if sock is self.front:
                    identity, *frames = await self.front.recv_multipart()
                    self.requests.append((Cmd(frames[1][0]), msgpack.unpackb(frames[2], raw=False)))
                    if identity not in self.backs:
                        back = self.backs[identity] = self.ctx.socket(zmq.DEALER)
                        back.setsockopt(zmq.LINGER, 0)
                        back.connect(self.broker)
                        poller.register(back, zmq.POLLIN)
                    await self.backs[identity].send_multipart(frames)
                else:
                    identity = next(i for i, b in self.backs.items() if b is sock)
                    await self.front.send_multipart([identity, *await sock.recv_multipart()])

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        for sock in [self.front, *self.backs.values()]:
            sock.close(linger=0)
        self.ctx.term()


async def test_every_request_made_for_a_caller_names_its_tenant(broker, tmp_path):
    """With tenants on (a CURVE broker, the gateway's key in its gateway allowlist), every request the
    gateway makes for a caller carries `tenant` = the token's name, and a submit carries the code right."""
    from nsd.gateway.auth import Caller
    from nsd.gateway.broker import BrokerPool
    from nsd.gateway.fanout import Feeds
    from nsd.gateway.service import Gateway

    relay = Relay(broker.endpoints["clients"])
    pool = BrokerPool(relay.endpoint, size=2, name_tenant=True)
    feeds = Feeds(pool, idle_s=0.2)
    gateway = Gateway(pool, feeds)
    alice, bob = Caller("alice", code=True), Caller("bob", code=False)

    async def chunks(data: bytes):
        yield data

    try:
        ref = await gateway.upload(alice, chunks((DIGITS / "recipe.py").read_bytes()), "recipe.py", False)
        spec = digits_spec()
        spec["model"]["shared"], spec["recipe"]["file"] = True, ref
        task_id = await gateway.submit(alice, spec)
        await gateway.get(alice, task_id)
        await gateway.list(bob)
        await gateway.logs(alice, task_id)
        events = await gateway.watch(alice, task_id)
        assert (await anext(events))["kind"] == "snapshot"
        await events.aclose()
        await gateway.cancel(alice, task_id)
        await gateway.cluster(bob)
    finally:
        await feeds.close()
        await pool.close()
        await relay.close()
    kinds = {cmd for cmd, _ in relay.requests}
    assert {Cmd.BLOB_HAVE, Cmd.BLOB_PUT, Cmd.SUBMIT, Cmd.RESULT_GET, Cmd.STATUS, Cmd.LIST, Cmd.LOGS,
            Cmd.CANCEL_TASK, Cmd.CLUSTER, Cmd.HELLO} <= kinds
    for cmd, body in relay.requests:
        assert body.get("tenant") in ("alice", "bob"), (cmd, body)
    assert {body["tenant"] for cmd, body in relay.requests if cmd in (Cmd.LIST, Cmd.CLUSTER)} == {"bob"}
    (submitted,) = [body for cmd, body in relay.requests if cmd is Cmd.SUBMIT]
    assert submitted["tenant"] == "alice" and submitted["code"] is True


async def test_without_curve_no_tenant_is_named(http, gateway, client):
    """The broker's one tenant without CURVE: the gateway names none (a tenant named by a key that is not
    a gateway's would be refused by a broker with tenants)."""
    assert gateway.client.name_tenant is False
    assert (await http.get("/v1/tasks")).status_code == 200


async def test_delete_of_an_unknown_task_is_404(http, client):
    """DELETE /v1/tasks/{id} answers an unknown id as every other call does."""
    answer = await http.delete("/v1/tasks/0123456789ab")
    assert answer.status_code == 404, answer.text
