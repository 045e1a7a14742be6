"""A real gateway (uvicorn + grpc.aio on random loopback ports) in front of the real test broker."""

from __future__ import annotations

import pytest

from tests.conftest import DIGITS

TOKEN = "alice-token-0123456789abcdef"
LIMITS = {"max_body": 64 << 10, "max_upload": 4 << 20}
KEEPALIVE_S = 0.5


@pytest.fixture
async def gateway(broker, tmp_path):
    pytest.importorskip("fastapi")
    from nsd.gateway.app import Limits
    from nsd.gateway.server import GatewayConfig, GatewayServer

    tokens = tmp_path / "tokens"
    tokens.write_text(f"# name token\nalice {TOKEN}\n")
    server = GatewayServer(GatewayConfig(broker=broker.endpoints["clients"], http="127.0.0.1:0",
                                         grpc="127.0.0.1:0", tokens=tokens, limits=Limits(**LIMITS),
                                         keepalive_s=KEEPALIVE_S))
    await server.start()
    yield server
    await server.stop()
    assert server.client is None


@pytest.fixture
async def http(gateway):
    import httpx

    async with httpx.AsyncClient(base_url=gateway.endpoints["http"], timeout=60,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


async def upload_digits(http) -> dict:
    """The digits spec with its model and recipe uploaded through REST, as a curl user would."""
    from tests.conftest import digits_spec

    spec = digits_spec()
    for section, key, path in (("model", "path", DIGITS / "model.pt"), ("recipe", "file", DIGITS / "recipe.py")):
        answer = await http.post("/v1/uploads", params={"name": path.name}, content=path.read_bytes())
        assert answer.status_code == 201, answer.text
        spec[section][key] = answer.json()["ref"]
    return spec
