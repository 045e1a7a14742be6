"""Issue 16 through the gateway, end to end against a CURVE broker with tenants (lane `tenants`: this module
runs once `nsd.tenants` and its `tenants` fixture are on main): two tokens, two tenants; bob learns nothing
of alice's task through REST, SSE, gRPC or the web view's calls, and alice deletes hers."""

from __future__ import annotations

import pytest

from tests.conftest import DIGITS, digits_spec
from tests.gateway_fixtures import BOB_TOKEN, OCTETS, TOKEN, gateway_config

pytest.importorskip("nsd.tenants")
pytest.importorskip("fastapi")
grpc = pytest.importorskip("grpc")
ALICE, BOB = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {BOB_TOKEN}"}


@pytest.fixture
async def private_gateway(tenants, tmp_path):
    """The gateway in front of the tenants broker, with its own key `gw` (allowed as a gateway, with code)."""
    from nsd.gateway.server import GatewayServer

    config = gateway_config(tenants.broker, tmp_path, curve_key=tenants.secret["gw"], server_key=tenants.server)
    server = GatewayServer(config)
    await server.start()
    yield server
    await server.stop()


def same_answer(a, b, a_id: str, b_id: str) -> bool:
    return a.status_code == b.status_code and a.text.replace(a_id, "ID") == b.text.replace(b_id, "ID")


async def test_bob_learns_nothing_of_alices_task_and_alice_deletes_it(private_gateway):
    import httpx

    from nsd.gateway import nsd_pb2 as pb
    from nsd.gateway import nsd_pb2_grpc

    assert private_gateway.client.name_tenant
    async with httpx.AsyncClient(base_url=private_gateway.endpoints["http"], timeout=60) as http:
        ref = (await http.post("/v1/uploads", params={"name": "recipe.py"}, headers={**ALICE, **OCTETS},
                               content=(DIGITS / "recipe.py").read_bytes())).json()["ref"]
        spec = digits_spec()
        spec["model"]["shared"], spec["recipe"]["file"] = True, ref
        created = await http.post("/v1/tasks", json=spec, headers=ALICE)
        assert created.status_code == 201, created.text  # alice's `code` right went through to the broker
        task_id = created.json()["task_id"]
        unknown = "0123456789ab"

        assert [t["task_id"] for t in (await http.get("/v1/tasks", headers=ALICE)).json()["tasks"]] == [task_id]
        assert (await http.get("/v1/tasks", headers=BOB)).json()["tasks"] == []
        for method, path in (("GET", "/v1/tasks/{}"), ("GET", "/v1/tasks/{}/logs"), ("GET", "/v1/tasks/{}/events"),
                             ("GET", "/v1/tasks/{}/artifact"), ("POST", "/v1/tasks/{}/cancel"),
                             ("DELETE", "/v1/tasks/{}"), ("GET", "/task/status/{}"), ("GET", "/download/{}")):
            foreign = await http.request(method, path.format(task_id), headers=BOB)
            missing = await http.request(method, path.format(unknown), headers=BOB)
            assert foreign.status_code == 404 and same_answer(foreign, missing, task_id, unknown), (path, foreign.text)
        theirs = {**spec, "recipe": {"kind": "text-classification", "data": "/data/d.csv"},
                  "model": {"path": ref}}  # bob names alice's blob
        refused = await http.post("/v1/tasks", json=theirs, headers=BOB)
        assert refused.status_code == 422

        async with grpc.aio.insecure_channel(private_gateway.endpoints["grpc"]) as channel:
            stub = nsd_pb2_grpc.NsdStub(channel)
            bob = (("authorization", f"Bearer {BOB_TOKEN}"),)
            for call in (stub.Get(pb.TaskRequest(task_id=task_id), metadata=bob),
                         stub.Delete(pb.TaskRequest(task_id=task_id), metadata=bob)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Watch(pb.WatchRequest(task_id=task_id), metadata=bob):
                    pass
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert list((await stub.List(pb.ListRequest(), metadata=bob)).tasks) == []

        deleted = await http.delete(f"/v1/tasks/{task_id}", headers=ALICE)
        assert deleted.status_code == 200, deleted.text
        assert (await http.get(f"/v1/tasks/{task_id}", headers=ALICE)).status_code == 404
        assert (await http.get("/v1/tasks", headers=ALICE)).json()["tasks"] == []
