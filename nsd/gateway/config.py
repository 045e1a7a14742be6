"""GatewayConfig: every gateway setting and its default (`nsd gateway` options and gateway.toml keys are
these). Light: the CLI reads its defaults here without loading the gateway's web and gRPC stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    max_body: int = 1 << 20  # a JSON request: a task spec is a few KiB
    max_upload: int = 16 << 30  # one uploaded file or folder (a tar), spooled to disk, never to memory
    max_tar_members: int = 100_000  # entries in an uploaded folder's tar (each costs a header and a file)
    max_tar_header: int = 64 << 10  # one PAX or GNU long-name header (tarfile reads each whole)


@dataclass
class GatewayConfig:
    broker: str | None = None
    http: str | None = "127.0.0.1:8550"
    grpc: str | None = "127.0.0.1:8551"
    tokens: str | Path | None = None
    no_auth: bool = False  # development on loopback: no tokens, one tenant, every right
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    insecure: bool = False
    curve_key: str | Path | None = None
    server_key: str | Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides the bind address and loopback ("*": any)
    limits: Limits = Limits()
    keepalive_s: float = 15.0  # an SSE comment after this long without an event
    header_timeout_s: float = 10.0  # a request head (first byte to blank line) must arrive within this
    body_idle_s: float = 60.0  # a request body that sends nothing for this long is given up (408)
    max_connections: int = 4096  # HTTP connections in all; past it uvicorn answers 503
    max_connections_per_client: int = 128  # per address (IPv6: per /64); past it a connection (gRPC: a call) is refused
    grpc_idle_s: float = 60.0  # a gRPC connection with no call for this long is closed (its channel reconnects)
    max_streams: int = 1024  # event streams (SSE, gRPC Watch, /task/screen) in all
    max_streams_per_token: int = 32
    events_probe_s: float = 2.0  # a followed task quiet this long: ask the broker for its seq (zguide Clone)
    broker_connections: int = 8  # requests to the broker in flight at once (uploads have their own)
    broker_timeout_s: float = 10.0  # a request the broker has not answered by then: 503 (broker unavailable)
