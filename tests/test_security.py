"""CURVE + ZAP with per-role allowlists (nsd/security/) over real loopback sockets, and `nsd keys`."""

from __future__ import annotations

import asyncio
import json
import stat
from types import SimpleNamespace

import pytest
import zmq
import zmq.asyncio
from click.testing import CliRunner
from zmq.utils.monitor import recv_monitor_message

from nsd import security
from nsd.cli.keys import keys as keys_group
from nsd.security import ClientKeys, CurveServer, HandshakeWatch, KeyFileError, apply_client

TIMEOUT_MS = 5000  # for things that must happen; refusals are observed, not waited out
QUIET_MS = 200  # how long "nothing arrives" is checked after a refusal was observed


@pytest.fixture
def keys(tmp_path) -> SimpleNamespace:
    """Key pairs for the broker, a worker, a client and a stranger; worker and client allowed."""
    mine, keys_dir = tmp_path / "mine", tmp_path / "keys"
    k = SimpleNamespace(dir=keys_dir)
    for name in ("broker", "worker", "client", "stranger"):
        setattr(k, name, security.generate_keypair(mine, name))  # (public, secret)
    security.allow(keys_dir, "worker", k.worker[0])
    security.allow(keys_dir, "client", k.client[0])
    return k


class Server:
    """A minimal broker: clients ROUTER, workers ROUTER, events XPUB, all CURVE; sockets monitored."""

    def __init__(self, keys):
        self.ctx = zmq.asyncio.Context()
        self.curve = CurveServer(keys.broker[1], keys.dir)
        self.socks, self.endpoints, self.monitors = {}, {}, {}

    async def start(self) -> Server:
        self.curve.start(self.ctx)
        for name, kind in (("clients", zmq.ROUTER), ("workers", zmq.ROUTER), ("events", zmq.XPUB)):
            sock = self.ctx.socket(kind)
            sock.linger = 0
            self.curve.apply(sock, security.SOCKET_DOMAINS[name])
            self.monitors[name] = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                          | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            sock.bind("tcp://127.0.0.1:*")
            self.socks[name], self.endpoints[name] = sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self

    async def handshake(self, name: str) -> tuple[int, int]:
        """The next handshake outcome on socket `name`: (event, value)."""
        mon = self.monitors[name]
        assert await mon.poll(TIMEOUT_MS), f"no handshake on {name} in time"
        event = await recv_monitor_message(mon)
        return event["event"], event["value"]

    async def close(self) -> None:
        for name, sock in self.socks.items():
            sock.disable_monitor()
            self.monitors[name].close(linger=0)
            sock.close(linger=0)
        await self.curve.stop()
        self.ctx.term()


@pytest.fixture
async def server(keys):
    s = await Server(keys).start()
    yield s
    await s.close()
    assert s.ctx.closed and not s.curve.running


@pytest.fixture
async def peers():
    """peers(kind, endpoint, pair=None, server=None): connected sockets in their own context (as on
    another host); pair=(public, secret) files, server=the broker's public file; None: no CURVE."""
    ctx = zmq.asyncio.Context()
    made: list[zmq.Socket] = []

    def connect(kind: int, endpoint: str, pair=None, server=None) -> zmq.asyncio.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        made.append(sock)
        if pair is not None:
            apply_client(sock, pair[1], server)
        sock.connect(endpoint)
        return sock

    yield connect
    for sock in made:
        sock.close(linger=0)
    ctx.term()


async def roundtrip(server: Server, name: str, dealer: zmq.asyncio.Socket) -> bytes:
    await dealer.send(b"ping")
    router = server.socks[name]
    assert await router.poll(TIMEOUT_MS), "the server got nothing"
    identity, body = await router.recv_multipart()
    await router.send_multipart([identity, body + b"/pong"])
    assert await dealer.poll(TIMEOUT_MS), "no reply"
    return await dealer.recv()


async def assert_refused(server: Server, name: str, dealer: zmq.asyncio.Socket, event: int) -> None:
    await dealer.send(b"let me in")
    assert (await server.handshake(name))[0] == event
    assert await server.socks[name].poll(QUIET_MS) == 0, "a refused peer's message got through"


# ---- sockets -----------------------------------------------------------------------------------------


async def test_allowed_client_round_trip_on_clients_domain(server, peers, keys):
    dealer = peers(zmq.DEALER, server.endpoints["clients"], keys.client, keys.broker[0])
    assert await roundtrip(server, "clients", dealer) == b"ping/pong"
    assert (await server.handshake("clients"))[0] == zmq.EVENT_HANDSHAKE_SUCCEEDED


async def test_allowed_worker_round_trip_and_user_id(server, peers, keys):
    dealer = peers(zmq.DEALER, server.endpoints["workers"], keys.worker, keys.broker[0])
    await dealer.send(b"ready")
    assert await server.socks["workers"].poll(TIMEOUT_MS)
    _, body = await server.socks["workers"].recv_multipart(copy=False)
    # ZAP's user id is the peer's Z85 public key: the broker can tell which key sent a message.
    assert body.get("User-Id") == security.read_certificate(keys.worker[0])[0].decode()


async def test_client_socket_user_ids_name_the_role_the_tenant_and_the_code_flag(server, peers, keys, tmp_path):
    """On the client socket a key's User-Id is ROLE:NAME[:code] (nsd.tenants): the name is its tenant."""
    gateway = security.generate_keypair(tmp_path / "mine", "gw")
    security.allow(keys.dir, "gateway", gateway[0], code=True)
    server.curve.reload()
    seen = []
    for pair in (keys.client, gateway):
        dealer = peers(zmq.DEALER, server.endpoints["clients"], pair, keys.broker[0])
        await dealer.send(b"hello")
        assert await server.socks["clients"].poll(TIMEOUT_MS)
        _, body = await server.socks["clients"].recv_multipart(copy=False)
        seen.append(body.get("User-Id"))
    assert seen == ["client:client", "gateway:gw:code"]


async def test_unknown_key_is_refused(server, peers, keys):
    dealer = peers(zmq.DEALER, server.endpoints["clients"], keys.stranger, keys.broker[0])
    await assert_refused(server, "clients", dealer, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert await dealer.poll(QUIET_MS) == 0


async def test_client_key_cannot_talk_on_workers_domain(server, peers, keys):
    dealer = peers(zmq.DEALER, server.endpoints["workers"], keys.client, keys.broker[0])
    await assert_refused(server, "workers", dealer, zmq.EVENT_HANDSHAKE_FAILED_AUTH)


async def test_worker_key_cannot_talk_on_clients_domain(server, peers, keys):
    dealer = peers(zmq.DEALER, server.endpoints["clients"], keys.worker, keys.broker[0])
    await assert_refused(server, "clients", dealer, zmq.EVENT_HANDSHAKE_FAILED_AUTH)


async def test_plaintext_peer_is_refused(server, peers):
    dealer = peers(zmq.DEALER, server.endpoints["clients"])  # no CURVE at all
    await dealer.send(b"let me in")
    # With ZAP_ENFORCE_DOMAIN, libzmq reports this one as "no detail" (the client sees a mechanism mismatch).
    event, _ = await server.handshake("clients")
    assert event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert await server.socks["clients"].poll(QUIET_MS) == 0


async def test_wrong_server_key_is_refused(server, peers, keys):
    dealer = peers(zmq.DEALER, server.endpoints["clients"], keys.client, keys.stranger[0])
    await dealer.send(b"let me in")
    assert (await server.handshake("clients"))[0] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    assert await server.socks["clients"].poll(QUIET_MS) == 0


async def test_events_reach_allowed_subscribers_only(server, peers, keys):
    xpub = server.socks["events"]
    stranger = peers(zmq.SUB, server.endpoints["events"], keys.stranger, keys.broker[0])
    stranger.subscribe(b"")
    assert (await server.handshake("events"))[0] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    worker = peers(zmq.SUB, server.endpoints["events"], keys.worker, keys.broker[0])
    worker.subscribe(b"")
    assert (await server.handshake("events"))[0] == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # workers never subscribe
    client = peers(zmq.SUB, server.endpoints["events"], keys.client, keys.broker[0])
    client.subscribe(b"")
    assert (await server.handshake("events"))[0] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert await xpub.poll(TIMEOUT_MS)
    assert await xpub.recv() == b"\x01"  # the allowed subscription, and only that one
    await xpub.send_multipart([b"task1", b"event"])
    assert await client.poll(TIMEOUT_MS)
    assert await client.recv_multipart() == [b"task1", b"event"]
    assert await stranger.poll(QUIET_MS) == 0 and await worker.poll(0) == 0
    assert await xpub.poll(0) == 0


async def test_reload_allows_new_keys_and_drops_revoked_ones(server, peers, keys):
    first = peers(zmq.DEALER, server.endpoints["clients"], keys.stranger, keys.broker[0])
    await assert_refused(server, "clients", first, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    security.allow(keys.dir, "client", keys.stranger[0])
    assert server.curve.reload() == {"worker": 1, "client": 2, "gateway": 0, "admin": 0}
    # A ZAP-refused connection is not retried by libzmq: a new socket is needed.
    second = peers(zmq.DEALER, server.endpoints["clients"], keys.stranger, keys.broker[0])
    assert await roundtrip(server, "clients", second) == b"ping/pong"
    assert (await server.handshake("clients"))[0] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    security.revoke(keys.dir, "client", "stranger")
    server.curve.reload()
    third = peers(zmq.DEALER, server.endpoints["clients"], keys.stranger, keys.broker[0])
    await assert_refused(server, "clients", third, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert await roundtrip(server, "clients", second) == b"ping/pong"  # ZAP ran at its handshake only


async def test_no_zap_handler_means_refused_not_open(keys, peers):
    """libzmq lets every key in when a CURVE socket's context has no ZAP handler; apply() forbids that."""
    s = await Server(keys).start()
    try:
        await s.curve.stop()  # handler gone, sockets still bound
        dealer = peers(zmq.DEALER, s.endpoints["clients"], keys.client, keys.broker[0])
        await dealer.send(b"let me in")
        assert (await s.handshake("clients"))[0] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        assert await s.socks["clients"].poll(QUIET_MS) == 0
    finally:
        await s.close()


async def test_handshake_watch_explains_refusals(server, keys):
    ctx = zmq.asyncio.Context()
    cases = [(keys.stranger, keys.broker[0], "refused this client's CURVE key"),
             (keys.client, keys.stranger[0], "server key"),
             (None, None, "without CURVE")]
    try:
        for pair, server_key, expected in cases:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if pair is not None:
                ClientKeys.load(pair[1], server_key).apply(sock)
            watch = HandshakeWatch(sock)
            try:
                sock.connect(server.endpoints["clients"])
                await sock.send(b"hello")
                problem = None
                for _ in range(250):
                    if (problem := await watch.problem()) is not None:
                        break
                    await asyncio.sleep(0.02)
                assert problem is not None and expected in problem
            finally:
                watch.close()
                sock.close(linger=0)
        sock = ctx.socket(zmq.DEALER)
        ClientKeys.load(keys.client[1], keys.broker[0]).apply(sock)
        watch = HandshakeWatch(sock)
        try:
            sock.connect(server.endpoints["clients"])
            await sock.send(b"hello")
            assert await server.socks["clients"].poll(TIMEOUT_MS)
            assert await watch.problem() is None
        finally:
            watch.close()
            sock.close(linger=0)
    finally:
        ctx.term()


async def test_apply_checks_its_preconditions(keys):
    ctx = zmq.asyncio.Context()
    curve = CurveServer(keys.broker[1], keys.dir)
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(RuntimeError, match="start"):
            curve.apply(sock, "clients")
        curve.start(ctx)
        with pytest.raises(ValueError, match="unknown ZAP domain"):
            curve.apply(sock, "events")
        sock.bind("tcp://127.0.0.1:*")
        with pytest.raises(RuntimeError, match="before bind"):
            curve.apply(sock, "clients")
        other = CurveServer(keys.broker[1], keys.dir)
        with pytest.raises(RuntimeError, match="already has a ZAP handler"):  # one per context
            other.start(ctx)
        await other.stop()
    finally:
        sock.close(linger=0)
        await curve.stop()
        ctx.term()


def test_key_file_errors_say_what_to_do(keys, tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        CurveServer(tmp_path / "nope.key_secret", keys.dir)
    with pytest.raises(KeyFileError, match=r"public certificate.*\.key_secret"):
        CurveServer(keys.broker[0], keys.dir)
    with pytest.raises(KeyFileError, match=r"public certificate"):
        ClientKeys.load(keys.client[0], keys.broker[0])
    with pytest.raises(KeyFileError, match="does not exist"):
        ClientKeys.load(keys.client[1], tmp_path / "broker.key")
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    with pytest.raises(KeyFileError, match="not a CURVE certificate"):
        ClientKeys.load(keys.client[1], junk)
    damaged = tmp_path / "damaged.key"
    damaged.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(KeyFileError, match="damaged"):
        security.read_certificate(damaged)
    assert issubclass(KeyFileError, ValueError)  # cli.py's _Errors prints it as one line


# ---- key files ---------------------------------------------------------------------------------------


def test_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    public, secret = security.generate_keypair(tmp_path / "k", "node1")
    assert (public.name, secret.name) == ("node1.key", "node1.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = security.read_certificate(secret)
    assert sec is not None and security.read_certificate(public) == (pub, None)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["node1.key", "node1.key_secret"]
    before = secret.read_bytes()
    with pytest.raises(FileExistsError, match="not overwriting"):
        security.generate_keypair(tmp_path / "k", "node1")
    assert secret.read_bytes() == before
    with pytest.raises(ValueError, match="bad key name"):
        security.generate_keypair(tmp_path / "k", "../evil")


def test_allow_copies_only_the_public_key_and_keeps_roles_apart(keys):
    entry = security.allow(keys.dir, "client", keys.stranger[1])  # the secret file, by mistake
    assert entry == keys.dir / "clients" / "stranger.key"
    assert "secret" not in entry.read_text()
    assert security.read_certificate(entry) == (security.read_certificate(keys.stranger[0])[0], None)
    assert security.allow(keys.dir, "client", keys.stranger[0]) == entry  # again: nothing changes
    with pytest.raises(ValueError, match="already allowed as a client"):
        security.allow(keys.dir, "worker", keys.stranger[0])
    other = keys.dir.parent / "elsewhere"
    security.generate_keypair(other, "stranger")
    with pytest.raises(FileExistsError, match="already allowed"):
        security.allow(keys.dir, "client", other / "stranger.key")
    with pytest.raises(ValueError, match="unknown role"):
        security.allow(keys.dir, "root", keys.stranger[0])
    with pytest.raises(ValueError, match="already allowed as a client"):
        security.allow(keys.dir, "admin", keys.stranger[0])  # one key, one role: also for the new roles
    # Flags: set on the entry, changed by allowing the same key again, and only where they mean something.
    assert security.read_flags(security.allow(keys.dir, "client", keys.stranger[0], code=True)) == {"code"}
    assert security.read_certificate(entry)[0] == security.read_certificate(keys.stranger[0])[0]
    assert security.read_flags(security.allow(keys.dir, "client", keys.stranger[0])) == frozenset()
    with pytest.raises(ValueError, match="--trusted is for worker"):
        security.allow(keys.dir, "client", keys.stranger[0], trusted=True)
    with pytest.raises(ValueError, match="--code is for"):
        security.allow(keys.dir, "worker", keys.worker[0], code=True)


def test_default_keys_dir_is_the_brokers_state_dir(monkeypatch, tmp_path):
    from nsd.config import default_state_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert security.default_keys_dir() == default_state_dir() / "keys" == tmp_path / "nsd" / "broker" / "keys"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert security.default_keys_dir() == default_state_dir() / "keys"


# ---- nsd keys ----------------------------------------------------------------------------------------


def test_cli_generate_allow_list(tmp_path):
    runner = CliRunner()
    mine, keys_dir = tmp_path / "mine", tmp_path / "keys"
    result = runner.invoke(keys_group, ["generate", "w1", "--dir", str(mine)])
    assert result.exit_code == 0, result.output
    assert "w1.key" in result.output and "nsd keys allow" in result.output

    result = runner.invoke(keys_group, ["generate", "w1", "--dir", str(mine)])
    assert result.exit_code == 1 and "already exists" in result.output and "Traceback" not in result.output

    result = runner.invoke(keys_group, ["allow", "--role", "worker", str(mine / "w1.key"), "--keys-dir",
                                        str(keys_dir)])
    assert result.exit_code == 0, result.output
    assert (keys_dir / "workers" / "w1.key").is_file()

    result = runner.invoke(keys_group, ["allow", "--role", "client", str(mine / "w1.key"), "--keys-dir",
                                        str(keys_dir)])
    assert result.exit_code == 1 and "one role only" in result.output

    runner.invoke(keys_group, ["generate", "alice", "--dir", str(mine)])
    result = runner.invoke(keys_group, ["allow", "--role", "client", str(mine / "alice.key_secret"),
                                        "--keys-dir", str(keys_dir)])
    assert result.exit_code == 0 and "SECRET" in result.stderr

    result = runner.invoke(keys_group, ["list", "--keys-dir", str(keys_dir)])
    assert result.exit_code == 0
    public = security.read_certificate(mine / "w1.key")[0].decode()
    assert f"w1  {public}" in result.output and "alice" in result.output
    listing = json.loads(runner.invoke(keys_group, ["list", "--keys-dir", str(keys_dir), "--json"]).output)
    assert listing["worker"] == [{"name": "w1", "public_key": public, "flags": []}]
    assert [k["name"] for k in listing["client"]] == ["alice"]

    result = runner.invoke(keys_group, ["revoke", "--role", "client", "alice", "--keys-dir", str(keys_dir)])
    assert result.exit_code == 0 and not (keys_dir / "clients" / "alice.key").exists()

    # Gateways, admins and flags (README "Privacy").
    runner.invoke(keys_group, ["generate", "gw", "--dir", str(mine)])
    result = runner.invoke(keys_group, ["allow", "--role", "gateway", str(mine / "gw.key"), "--code",
                                        "--keys-dir", str(keys_dir)])
    assert result.exit_code == 0 and "allowed gateway key 'gw' (code)" in result.output
    result = runner.invoke(keys_group, ["allow", "--role", "worker", str(mine / "w1.key"), "--trusted",
                                        "--keys-dir", str(keys_dir)])
    assert result.exit_code == 0 and "(trusted)" in result.output  # the same key again: its flags change
    result = runner.invoke(keys_group, ["allow", "--role", "worker", str(mine / "w1.key"), "--code",
                                        "--keys-dir", str(keys_dir)])
    assert result.exit_code == 1 and "--code is for" in result.output
    listing = json.loads(runner.invoke(keys_group, ["list", "--keys-dir", str(keys_dir), "--json"]).output)
    assert listing["gateway"] == [{"name": "gw", "public_key": security.read_certificate(mine / "gw.key")[0].decode(),
                                   "flags": ["code"]}]
    assert listing["worker"][0]["flags"] == ["trusted"] and listing["admin"] == []


def test_cli_errors_are_one_clear_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(keys_group, ["allow", "--role", "worker", str(tmp_path / "missing.key"),
                                        "--keys-dir", str(tmp_path / "keys")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"key file {tmp_path / 'missing.key'} does not exist" in result.output
    result = runner.invoke(keys_group, ["allow", "--role", "root", str(tmp_path / "x.key")])
    assert result.exit_code == 2 and "root" in result.output
    result = runner.invoke(keys_group, ["revoke", "--role", "worker", "ghost", "--keys-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no worker key named 'ghost'" in result.output
    result = runner.invoke(keys_group, ["list", "--keys-dir", str(tmp_path / "empty")])
    assert result.exit_code == 0 and "workers: none" in result.output and "clients: none" in result.output
    assert "gateways: none" in result.output and "admins: none" in result.output


def test_cli_default_dirs_follow_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    runner = CliRunner()
    assert runner.invoke(keys_group, ["generate", "c1"]).exit_code == 0
    public = tmp_path / "config" / "nsd" / "keys" / "c1.key"
    assert runner.invoke(keys_group, ["allow", "--role", "client", str(public)]).exit_code == 0
    assert (tmp_path / "state" / "nsd" / "broker" / "keys" / "clients" / "c1.key").is_file()
