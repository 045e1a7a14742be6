"""The gRPC door's bounds, as the REST door's (tests/test_gateway_door.py): one address holds at most its
cap of calls over all its connections, refused before its token is looked at, and a connection that
carries no call is closed."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import wait_for
from tests.gateway_fixtures import AUTH, gateway_config, pb
from tests.peers import spec

grpc = pytest.importorskip("grpc")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # and an empty SETTINGS


@pytest.fixture
async def door(broker, tmp_path):
    from nsd.gateway.server import GatewayServer

    server = GatewayServer(gateway_config(broker, tmp_path, http=None, max_connections_per_client=2,
                                          grpc_idle_s=1.0))
    await server.start()
    yield server
    await server.stop()


async def test_one_address_holds_at_most_its_cap_of_calls(door, client):
    from nsd.gateway import nsd_pb2_grpc

    task_id = await client.submit(spec())  # no worker: it stays queued, its event streams open
    address = door.endpoints["grpc"]
    async with grpc.aio.insecure_channel(address) as first, grpc.aio.insecure_channel(address) as second:
        watches = [nsd_pb2_grpc.NsdStub(channel).Watch(pb().WatchRequest(task_id=task_id), metadata=AUTH)
                   for channel in (first, second)]  # one call on each of two connections
        for watch in watches:
            assert (await watch.read()).kind == "snapshot"
        async with grpc.aio.insecure_channel(address) as third:
            stub = nsd_pb2_grpc.NsdStub(third)
            for metadata in (AUTH, ()):  # with a token or without: refused before the token is looked at
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Ping(pb().PingRequest(), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "this address has 2 calls open" in refused.value.details()
            watches[0].cancel()
            await wait_for(lambda: sum(door.grpc_service.calls.open.values()) == 1, 30)
            assert (await stub.Ping(pb().PingRequest(), metadata=AUTH)).gateway_version
        watches[1].cancel()
    await wait_for(lambda: not door.grpc_service.calls.open, 30)  # every call released


async def test_a_connection_that_carries_no_call_is_closed(door):
    host, port = door.endpoints["grpc"].rsplit(":", 1)

    def idle_connection() -> bytes:
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(H2_PREFACE)  # a whole HTTP/2 handshake, then no call
            received = b""
            while chunk := s.recv(4096):
                received += chunk
            return received

    received = await asyncio.wait_for(asyncio.to_thread(idle_connection), 60)  # closed, not timed out here
    assert frames_of_type(received, 7), received  # with a GOAWAY first


def frames_of_type(data: bytes, kind: int) -> list[bytes]:
    """The HTTP/2 frames of one type in what a server sent (9-byte headers: length, type, flags, stream)."""
    found, at = [], 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        if data[at + 3] == kind:
            found.append(data[at + 9:at + 9 + length])
        at += 9 + length
    return found
