"""The gateway's settings, in one place: the `nsd gateway` options and `gateway.toml` keys take their
defaults from these fields (`nsd.cli.daemons`), and `GatewayServer` takes one `GatewayConfig`. Plain data:
importing it needs none of the gateway's extra packages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    max_body: int = 1 << 20  # a JSON request: a task spec is a few KiB
    max_upload: int = 16 << 30  # one uploaded file or folder (a tar), spooled to disk, never to memory


@dataclass
class GatewayConfig:
    broker: str | None = None
    http: str | None = "127.0.0.1:8550"
    grpc: str | None = "127.0.0.1:8551"
    tokens: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    insecure: bool = False
    curve_key: str | Path | None = None
    server_key: str | Path | None = None
    limits: Limits = Limits()
    keepalive_s: float = 15.0  # an SSE comment after this long without an event
