"""Running the gateway: the broker client, uvicorn for REST/SSE/web and grpc.aio, on one event loop.

Like the broker, a non-loopback bind is refused unless it has both tokens and TLS (or --insecure):
bearer tokens over plain HTTP on a network are as good as none.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from pathlib import Path

import grpc
import uvicorn

from nsd.client.api import AsyncClient
from nsd.gateway.app import create_app
from nsd.gateway.auth import Tokens
from nsd.gateway.config import GatewayConfig
from nsd.gateway.grpc_service import add_to_server
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
    for door in (config.http, config.grpc):
        if door is None:
            continue
        host, _ = split_hostport(door)
        if not is_loopback(host) and not (config.tokens and config.tls_cert) and not config.insecure:
            raise ValueError(f"refusing to serve {door} (not loopback) without --tokens and --tls-cert/--tls-key; "
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
        self.client: AsyncClient | None = None
        self.gateway: Gateway | None = None
        self.endpoints: dict[str, str] = {}
        self._http: _Uvicorn | None = None
        self._http_task = None
        self._grpc: grpc.aio.Server | None = None

    def reload(self) -> None:
        self.tokens.reload()

    async def start(self) -> None:
        import asyncio

        config = self.config
        self.client = AsyncClient(config.broker, curve_key=config.curve_key, server_key=config.server_key)
        self.gateway = gateway = Gateway(self.client, config.limits.max_upload)
        if config.grpc is not None:
            self._grpc = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
            add_to_server(self._grpc, gateway, self.tokens)
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
            app = create_app(gateway, self.tokens, config.limits, config.keepalive_s)
            self._http = _Uvicorn(uvicorn.Config(
                app, lifespan="off", log_level="warning", access_log=False, ws="websockets-sansio",
                ssl_certfile=config.tls_cert and str(config.tls_cert),
                ssl_keyfile=config.tls_key and str(config.tls_key),
                timeout_keep_alive=30, limit_concurrency=1000, timeout_graceful_shutdown=5))
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
        if self.client is not None:
            await self.client.close()
            self.client = None


async def serve(config: GatewayConfig) -> None:
    """`nsd gateway`: run until SIGTERM/SIGINT; SIGHUP re-reads the token file; systemd is told each step."""
    import asyncio
    import signal

    from nsd.systemd import notify, watchdog_interval

    server = GatewayServer(config)
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
