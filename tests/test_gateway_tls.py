"""TLS on both doors: a self-signed certificate, trusted by the test's clients and by nothing else."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from tests.gateway_fixtures import TOKEN

pytest.importorskip("fastapi")
grpc = pytest.importorskip("grpc")


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "gateway.crt", tmp_path / "gateway.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_both_doors_speak_tls_and_nothing_else(broker, tmp_path, certificate):
    import httpx

    from nsd.gateway import nsd_pb2, nsd_pb2_grpc
    from nsd.gateway.server import GatewayConfig, GatewayServer

    cert, key = certificate
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    server = GatewayServer(GatewayConfig(broker=broker.endpoints["clients"], http="127.0.0.1:0", grpc="127.0.0.1:0",
                                         tokens=tokens, tls_cert=cert, tls_key=key))
    await server.start()
    try:
        base = server.endpoints["http"]
        assert base.startswith("https://")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as trusted:
            assert (await trusted.get(f"{base}/v1/cluster", headers=auth)).status_code == 200
        async with httpx.AsyncClient() as untrusting:  # the system's CAs do not know this certificate
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"{base}/healthz")
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(base.replace("https://", "http://") + "/healthz")

        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(server.endpoints["grpc"], creds) as channel:
            reply = await nsd_pb2_grpc.NsdStub(channel).Ping(nsd_pb2.PingRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert reply.broker == broker.endpoints["clients"]
        async with grpc.aio.insecure_channel(server.endpoints["grpc"]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await nsd_pb2_grpc.NsdStub(channel).Ping(nsd_pb2.PingRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()
