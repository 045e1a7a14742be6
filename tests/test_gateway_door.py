"""Issue 15, attack 4: nobody without a token takes the REST door down. Slow request heads are cut at a
deadline, one address holds a bounded number of connections, a stalled body is given up, and the daemon
raises its open-files limit; another client is answered meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port, kill_pid
from tests.gateway_fixtures import gateway_config

pytest.importorskip("fastapi")
ATTACKER = "127.0.0.2"  # another loopback address: the attacker is another client than the victim
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def slow_connections(port: int, n: int) -> list[socket.socket]:
    """n connections from ATTACKER that each sent part of a request head (and would trickle the rest)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(ATTACKER, 0))
        with contextlib.suppress(OSError):
            s.sendall(PARTIAL_HEAD)
        socks.append(s)
    return socks


def closed_by_peer(s: socket.socket, wait_s: float) -> bool:
    s.settimeout(wait_s)
    try:
        return s.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False


def daemon_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


@pytest.fixture
def attacker_can_open_a_thousand():
    from nsd.limits import raise_open_files_limit

    if raise_open_files_limit()[0] < 2500:  # this test's own side holds a descriptor per connection
        pytest.skip("the open files limit is too low to hold 1,000 connections here")


async def test_a_thousand_slow_heads_leave_the_door_open_for_others(broker, tmp_path, attacker_can_open_a_thousand):
    """The gateway as its daemon (`nsd gateway`, started with a soft limit of 1,024 open files under a
    hard limit of 8,192): 1,000 half-open connections from one address, and the victim still gets its
    answer; the attacker's connections are refused past the cap or cut at the head deadline."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 8192))

    proc = subprocess.Popen([sys.executable, "-m", "nsd", "gateway", "--no-auth", "--broker", broker.endpoints["clients"],
                             "--http", f"127.0.0.1:{port}", "--grpc", "", "--header-timeout", "3"],
                            env=env, preexec_fn=low_soft_limit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    socks: list[socket.socket] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as victim:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if (await victim.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            assert daemon_limits(proc.pid) == (8192, 8192)  # it raised its soft limit to the hard one
            socks = await asyncio.to_thread(slow_connections, port, 1000)
            loop = asyncio.get_running_loop()
            started = loop.time()
            answer = await victim.get("/healthz")
            waited = loop.time() - started
            assert answer.status_code == 200, answer.text  # before: 503 "Exceeded concurrency limit"
            print(f"victim answered in {waited:.3f} s beside 1,000 slow connections")
            # Past the per-client cap (128) the attacker's connections were closed at once; the rest are cut
            # when their head misses its deadline. Each is closed by the gateway, none left open.
            cut = await asyncio.to_thread(lambda: sum(closed_by_peer(s, 30) for s in socks))
            assert cut == len(socks)
            assert (await victim.get("/healthz")).status_code == 200
    finally:
        for s in socks:
            s.close()
        kill_pid(proc.pid)
        proc.wait(30)
        proc.stderr.close()


@pytest.fixture
async def guarded(broker, tmp_path):
    from nsd.gateway.server import GatewayServer

    server = GatewayServer(gateway_config(broker, tmp_path, no_auth=True, grpc=None, header_timeout_s=1.0,
                                          max_connections_per_client=4, body_idle_s=1.0))
    await server.start()
    yield server, int(server.endpoints["http"].rsplit(":", 1)[1])
    await server.stop()


async def test_a_head_that_misses_its_deadline_is_cut_and_a_whole_one_is_served(guarded):
    server, port = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # a whole head: served, kept alive
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(PARTIAL_HEAD)  # the next request on the same connection starts, and stalls
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 30) == b""  # cut at its deadline
    finally:
        writer.close()
    assert server.door.timed_out >= 1


async def test_one_address_holds_at_most_its_cap_of_connections(guarded):
    import httpx

    server, port = guarded
    held = await asyncio.to_thread(slow_connections, port, 4)
    extra = await asyncio.to_thread(slow_connections, port, 3)
    try:
        assert all(await asyncio.to_thread(lambda: [closed_by_peer(s, 30) for s in extra]))
        assert server.door.refused >= 3
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as other:
            assert (await other.get("/healthz")).status_code == 200  # another address: served
    finally:
        for s in held + extra:
            s.close()


async def test_a_stalled_body_is_given_up(guarded):
    _, port = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"name\": ")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 408")
    finally:
        writer.close()


def test_the_unit_raises_the_open_files_limit():
    unit = (ROOT / "systemd" / "nsd-gateway.service").read_text()
    assert "LimitNOFILE=65536" in unit
