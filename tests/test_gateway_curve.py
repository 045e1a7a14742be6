"""The gateway in front of a CURVE broker: it talks with its own client key, and without one gets nothing."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")


@pytest.mark.parametrize("who, healthy", [("alice", True), ("mallory", False), (None, False)])
async def test_gateway_uses_its_own_client_key(secure, tmp_path, who, healthy):
    import httpx

    from nsd.gateway.server import GatewayConfig, GatewayServer

    broker, secret, server_public = secure
    keys = {"curve_key": secret[who], "server_key": server_public} if who else {}
    server = GatewayServer(GatewayConfig(broker=broker.endpoints["clients"], http="127.0.0.1:0", grpc=None, no_auth=True,
                                         **keys))
    await server.start()
    server.client.timeout_s = 2  # a refused key is never answered: give up sooner than the default
    try:
        async with httpx.AsyncClient(base_url=server.endpoints["http"], timeout=30) as http:
            health = await http.get("/healthz")
            assert health.status_code == (200 if healthy else 503)
            if healthy:
                assert (await http.get("/v1/cluster")).json() == {"workers": []}
            else:
                assert (await http.get("/v1/tasks")).status_code == 503
    finally:
        await server.stop()
