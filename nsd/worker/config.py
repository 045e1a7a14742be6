"""The worker's settings, in one place: the `nsd worker` options and `worker.toml` keys take their
defaults from these fields (`nsd.cli.daemons`), and `WorkerDaemon` takes one `WorkerConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nsd.protocol import DEFAULT_ENDPOINTS


@dataclass
class WorkerConfig:
    broker: str = DEFAULT_ENDPOINTS["workers"]
    cpus: list[int] = field(default_factory=lambda: sorted(os.sched_getaffinity(0)))
    cores_per_trial: int = 1
    cache_dir: Path = Path.home() / ".cache" / "nsd" / "worker"
    worker_id: str | None = None
    heartbeat_s: float = 1.0
    liveness: int = 5
    backoff_max_s: float = 32.0
    cache_max_bytes: int = 20 * 1024**3  # fetched models and data kept for later tasks
    fetch_window: int = 4  # blob chunks in flight at once (credit-based flow control)
    chunk_timeout_s: float = 60.0
    preload: str = ""  # modules each runner imports before its first job (comma-separated), e.g. transformers
    grace_s: float = 30.0  # on SIGTERM: how long running trials may take to finish before being handed back
    curve_key: Path | None = None  # this worker's key pair (nsd keys generate), allowed on the broker as a worker
    server_key: Path | None = None  # the broker's public key
    sandbox: bool = True  # runners in bubblewrap (nsd.worker.sandbox); false only for development (--no-sandbox)
    shared_dirs: list[Path] = field(default_factory=list)  # shared-filesystem folders runners read (model.shared)
    runner_env: list[str] = field(default_factory=list)  # names of our environment variables runners also get
    label: str | None = None  # a kind of machine (e.g. "spr-64"): tasks with resources.hardware = label run here
