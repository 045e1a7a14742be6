"""Running the gateway: the broker client, uvicorn for REST/SSE/web and grpc.aio, on one event loop.

Safe by default: no tokens, no start (unless --no-auth, for development, on loopback only); and, like the
broker, a non-loopback bind needs TLS too (or --insecure): bearer tokens over plain HTTP on a network
are as good as none.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from pathlib import Path

import grpc
import uvicorn

from nsd.gateway.app import create_app
from nsd.gateway.auth import Tokens
from nsd.gateway.broker import BrokerPool
from nsd.gateway.door import DoorLimits, guarded_protocol
from nsd.gateway.fanout import Feeds
from nsd.gateway.grpc_service import MAX_STREAMS, add_to_server
from nsd.gateway.guard import served_hosts
from nsd.gateway.config import GatewayConfig
from nsd.gateway.service import Gateway

log = logging.getLogger("nsd.gateway")


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binds(config: GatewayConfig) -> None:
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if config.http is None and config.grpc is None:
        raise ValueError("nothing to serve: give --http and/or --grpc")
    if config.no_auth and config.tokens:
        raise ValueError("--no-auth and --tokens contradict each other: choose one")
    if not config.no_auth and not config.tokens:
        raise ValueError("refusing to start without --tokens (a file of `name token [code]` lines): anyone who "
                         "reaches the gateway could run code on the workers; pass --no-auth for development "
                         "on loopback")
    for door in (config.http, config.grpc):
        if door is None:
            continue
        host, _ = split_hostport(door)
        if is_loopback(host):
            continue
        if config.no_auth:
            raise ValueError(f"refusing to serve {door} (not loopback) with --no-auth: it is for development "
                             "on loopback only")
        if not config.tls_cert and not config.insecure:
            raise ValueError(f"refusing to serve {door} (not loopback) without --tls-cert/--tls-key; "
                             "pass --insecure to do it anyway")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the gateway's own handlers stop it (and SIGHUP reloads tokens); uvicorn must not take them


class GatewayServer:
    def __init__(self, config: GatewayConfig):
        check_binds(config)
        self.config = config
        self.tokens = Tokens(config.tokens)
        self.door = DoorLimits(config.header_timeout_s, config.max_connections_per_client)
        self.client: BrokerPool | None = None
        self.feeds: Feeds | None = None
        self.gateway: Gateway | None = None
        self.endpoints: dict[str, str] = {}
        self._http: _Uvicorn | None = None
        self._http_task = None
        self._grpc: grpc.aio.Server | None = None
        self.grpc_service = None  # the gRPC door's servicer (its per-address call counts), once started

    def reload(self) -> None:
        self.tokens.reload()

    async def start(self) -> None:
        import asyncio

        config = self.config
        # Tenants are named to the broker only where it has them: under CURVE (the gateway's key in its
        # gateway allowlist). Without CURVE the broker is one tenant, whatever the tokens' names.
        name_tenant = bool(config.curve_key) and self.tokens.required
        if self.tokens.required and not name_tenant and len(self.tokens.tenants) > 1:
            log.warning("gateway: the tokens name %d tenants, but without CURVE to the broker they share one "
                        "(README: Privacy)", len(self.tokens.tenants))
        self.client = BrokerPool(config.broker, size=config.broker_connections, timeout_s=config.broker_timeout_s,
                                 curve_key=config.curve_key, server_key=config.server_key, name_tenant=name_tenant)
        self.feeds = Feeds(self.client, config.max_streams, config.max_streams_per_token, config.events_probe_s)
        self.gateway = gateway = Gateway(self.client, self.feeds, config.limits)
        if config.grpc is not None:
            self._grpc = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.server_handshake_timeout_ms", int(config.header_timeout_s * 1000)),
                ("grpc.max_connection_idle_ms", int(config.grpc_idle_s * 1000)),
                ("grpc.max_concurrent_streams", MAX_STREAMS)])
            self.grpc_service = add_to_server(self._grpc, gateway, self.tokens, config.max_connections_per_client)
            host, port = split_hostport(config.grpc)
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if config.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                      Path(config.tls_cert).read_bytes())])
                port = self._grpc.add_secure_port(address, creds)
            else:
                port = self._grpc.add_insecure_port(address)
            await self._grpc.start()
            self.endpoints["grpc"] = f"{host}:{port}"
        if config.http is not None:
            host, port = split_hostport(config.http)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.set_inheritable(True)
            app = create_app(gateway, self.tokens, config.limits, config.keepalive_s,
                             served_hosts(host, config.allowed_hosts), config.body_idle_s)
            self._http = _Uvicorn(uvicorn.Config(
                app, lifespan="off", log_level="warning", access_log=False, ws="websockets-sansio",
                http=guarded_protocol(self.door), ssl_certfile=config.tls_cert and str(config.tls_cert),
                ssl_keyfile=config.tls_key and str(config.tls_key), timeout_keep_alive=30,
                limit_concurrency=config.max_connections, timeout_graceful_shutdown=5))
            self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
            while not self._http.started:
                if self._http_task.done():
                    self._http_task.result()  # raises why it could not start
                    raise RuntimeError("the HTTP server stopped while starting")
                await asyncio.sleep(0.02)
            scheme = "https" if config.tls_cert else "http"
            self.endpoints["http"] = f"{scheme}://{host}:{sock.getsockname()[1]}"
        log.info("gateway: serving %s for broker %s", self.endpoints, self.client.broker)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._http is not None:
            self._http.should_exit = True
            await self._http_task
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
            self._grpc = None
        if self.feeds is not None:
            await self.feeds.close()
            self.feeds = None
        if self.client is not None:
            await self.client.close()
            self.client = None


async def serve(config: GatewayConfig) -> None:
    """`nsd gateway`: run until SIGTERM/SIGINT; SIGHUP re-reads the token file; systemd is told each step."""
    import asyncio
    import signal

    from nsd.limits import raise_open_files_limit
    from nsd.systemd import notify, watchdog_interval

    server = GatewayServer(config)
    soft, _ = raise_open_files_limit()  # a descriptor per connection: the unit's LimitNOFILE is the hard one
    if soft < 4 * config.max_connections_per_client:
        log.warning("gateway: only %d open files allowed (raise LimitNOFILE)", soft)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        notify("RELOADING=1")
        server.reload()
        notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    await server.start()
    notify("READY=1", f"STATUS=serving {' '.join(f'{k} {v}' for k, v in server.endpoints.items())}")
    interval = watchdog_interval()
    while not stop.is_set():
        if interval:
            notify("WATCHDOG=1")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval or 3600)
    notify("STOPPING=1")
    await server.stop()
