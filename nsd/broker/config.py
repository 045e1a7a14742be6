"""The broker's settings, in one place: the `nsd broker` options and `broker.toml` keys are built from
these fields' defaults (`nsd.cli.daemons`), and `Broker` takes one `BrokerConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nsd.broker.limits import BrokerLimits
from nsd.config import default_state_dir
from nsd.protocol import DEFAULT_ENDPOINTS


@dataclass
class BrokerConfig:
    state_dir: Path = field(default_factory=default_state_dir)  # SQLite state, blobs, key allowlists
    clients: str = DEFAULT_ENDPOINTS["clients"]  # endpoints to bind: clients (ROUTER), workers (ROUTER), events (XPUB)
    workers: str = DEFAULT_ENDPOINTS["workers"]
    events: str = DEFAULT_ENDPOINTS["events"]
    heartbeat_s: float = 1.0  # a worker silent for heartbeat_s × liveness is dead; workers adopt both
    liveness: int = 5
    insecure: bool = False  # allow a non-loopback bind without CURVE
    metrics: str | None = None  # HOST:PORT for Prometheus (GET /metrics)
    curve_secret: Path | None = None  # the broker's key pair: CURVE on every socket
    keys_dir: Path | None = None  # allowlists (default STATE_DIR/keys)
    share_cache: bool = False  # reuse trusted workers' cached results across tenants (README "Privacy")
    retention_days: float = 0.0  # finished tasks are deleted this long after they end; 0: kept
    tenant_retention: dict[str, float] = field(default_factory=dict)  # per-tenant retention_days
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    # A broker pair (README "A broker pair"): the other broker's peer endpoint, ours to bind, and our role.
    peer: str | None = None
    peer_bind: str = "tcp://127.0.0.1:5553"
    role: str = "primary"  # primary | backup
