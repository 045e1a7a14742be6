"""The daemons: `nsd broker`, `nsd worker` and `nsd gateway`. Every option's default is its config's field
(BrokerConfig, WorkerConfig, GatewayConfig): one source."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import click

from nsd.broker.config import BrokerConfig
from nsd.cli.common import fail, setup_logging
from nsd.config import config_option
from nsd.gateway.config import GatewayConfig, Limits
from nsd.liveness import HEARTBEAT_BOUNDS_S, LIVENESS_BOUNDS
from nsd.protocol import DEFAULT_ENDPOINTS
from nsd.worker.config import WorkerConfig

BROKER, WORKER, GATEWAY = BrokerConfig(), WorkerConfig(), GatewayConfig()  # the options' defaults (one source)


def _tenant_days(values) -> dict[str, float]:
    """--tenant-retention NAME=DAYS (repeatable; a TOML list of such strings)."""
    out = {}
    for value in values or ():
        name, _, days = str(value).partition("=")
        try:
            out[name.strip()] = float(days)
            if not name.strip() or out[name.strip()] < 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected TENANT=DAYS, e.g. alice=30") from None
    return out


def _limit_options(command):
    """One --option per field of BrokerLimits (README "Security" says what each bounds)."""
    from nsd.broker.limits import LIMIT_HELP, BrokerLimits

    defaults = BrokerLimits()
    for name in reversed(BrokerLimits.names()):
        command = click.option(f"--{name.replace('_', '-')}", name, type=click.IntRange(min=1),
                               default=getattr(defaults, name), show_default=True, help=LIMIT_HELP[name])(command)
    return command


@click.command()
@config_option("broker")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where SQLite state lives (default: $XDG_STATE_HOME/nsd/broker).")
@click.option("--clients", default=BROKER.clients, show_default=True, help="Client endpoint to bind.")
@click.option("--workers", default=BROKER.workers, show_default=True, help="Worker endpoint to bind.")
@click.option("--events", default=BROKER.events, show_default=True, help="Event (XPUB) endpoint to bind.")
@click.option("--heartbeat", "heartbeat_s", default=BROKER.heartbeat_s, show_default=True,
              type=click.FloatRange(*HEARTBEAT_BOUNDS_S), help="Heartbeat interval, seconds (workers adopt it).")
@click.option("--liveness", default=BROKER.liveness, show_default=True, type=click.IntRange(*LIVENESS_BOUNDS),
              help="Missed heartbeats before a worker is dead (workers adopt it).")
@click.option("--insecure", is_flag=True, default=BROKER.insecure,
              help="Allow binding a non-loopback address without CURVE.")
@click.option("--metrics", default=BROKER.metrics, help="Serve Prometheus metrics at HOST:PORT (GET /metrics).")
@click.option("--curve-secret", envvar="NSD_CURVE_SECRET", default=BROKER.curve_secret,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The broker's key pair: turns on CURVE on every socket (env NSD_CURVE_SECRET).")
@click.option("--keys-dir", envvar="NSD_KEYS_DIR", default=BROKER.keys_dir, type=click.Path(file_okay=False, path_type=Path),
              help="Allowlists: KEYS_DIR/workers/*.key and KEYS_DIR/clients/*.key (default STATE_DIR/keys).")
@click.option("--peer", default=BROKER.peer,
              help="A broker pair: the other broker's peer endpoint (tcp://OTHER:5553); see README \"A broker pair\".")
@click.option("--peer-bind", default=BROKER.peer_bind, show_default=True, help="A broker pair: our peer endpoint to bind.")
@click.option("--role", type=click.Choice(["primary", "backup"]), default=BROKER.role, show_default=True,
              help="A broker pair: which of the two this one is.")
@click.option("--share-cache", is_flag=True, default=BROKER.share_cache,
              help="Reuse cached results across tenants (only those workers allowed with --trusted produced).")
@click.option("--retention-days", type=click.FloatRange(min=0), default=BROKER.retention_days, show_default=True,
              help="Delete finished tasks (and their models, logs, events, cache entries) this many days after "
                   "they end; 0 keeps them.")
@click.option("--tenant-retention", multiple=True, default=BROKER.tenant_retention, metavar="TENANT=DAYS",
              callback=lambda ctx, param, value: _tenant_days(value),
              help="retention-days for one tenant (repeatable; broker.toml: a list of such strings).")
@click.option("--log-level", default="info", show_default=True)
@_limit_options
def broker(state_dir, log_level, clients, workers, events, heartbeat_s, liveness, insecure, metrics, curve_secret,
           keys_dir, peer, peer_bind, role, share_cache, retention_days, tenant_retention,
           **limits) -> None:
    """Run the broker daemon."""
    from nsd.broker.daemon import Broker
    from nsd.broker.limits import BrokerLimits
    from nsd.limits import raise_open_files_limit
    from nsd.net import install_uvloop

    setup_logging(log_level)
    raise_open_files_limit()  # a descriptor per connected peer
    install_uvloop()
    config = BrokerConfig(clients=clients, workers=workers, events=events, heartbeat_s=heartbeat_s,
                          liveness=liveness, insecure=insecure, metrics=metrics, curve_secret=curve_secret,
                          keys_dir=keys_dir, limits=BrokerLimits(**limits), peer=peer, peer_bind=peer_bind, role=role,
                          share_cache=share_cache, retention_days=retention_days, tenant_retention=tenant_retention)
    if state_dir:
        config.state_dir = Path(state_dir)
    try:
        daemon = Broker(config)
    except ValueError as exc:
        fail(exc)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload)  # systemctl reload: re-read key allowlists
        try:
            await daemon.start()
        except (OSError, sqlite3.Error) as exc:  # a missing, read-only or broken state dir: one line, exit 1
            await daemon.stop()
            raise click.ClickException(f"cannot use the state dir {daemon.state_dir}: {exc}") from None
        await stop.wait()
        await daemon.stop()

    asyncio.run(serve())


@click.command()
@config_option("worker")
@click.option("--broker", "broker_addr", envvar="NSD_WORKER_BROKER", default=WORKER.broker,
              show_default=True, help="The broker's worker endpoint; a broker pair's two, comma-separated (env NSD_WORKER_BROKER).")
@click.option("--cores", type=int, default=None,
              help="Use the first N cores this process may run on (lowest ids; default: all of them).")
@click.option("--cpus", default=None,
              help="Use exactly these CPUs, e.g. 0-3,8 (two workers on one host: give each its own list).")
@click.option("--cores-per-trial", type=int, default=WORKER.cores_per_trial, show_default=True,
              help="Cores per slot (trial).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Scratch, logs and outbox (default: ~/.cache/nsd/worker).")
@click.option("--cache-size", default=WORKER.cache_max_bytes / 1024**3, show_default=True,
              help="GiB of fetched models and data to keep; least recently used are evicted first.")
@click.option("--id", "worker_id", default=WORKER.worker_id, help="Worker id (default: host name + a persisted suffix).")
@click.option("--heartbeat", default=WORKER.heartbeat_s, show_default=True, type=click.FloatRange(*HEARTBEAT_BOUNDS_S),
              help="Heartbeat interval, seconds, until the broker's is adopted at registration.")
@click.option("--grace", default=WORKER.grace_s, show_default=True,
              help="On SIGTERM, seconds running trials may take to finish before they are handed back.")
@click.option("--preload", default=WORKER.preload,
              help="Modules each runner imports before its first job, comma-separated (e.g. transformers: the "
                   "built-in recipes' import, seconds otherwise paid by the first job of each runner).")
@click.option("--curve-key", envvar="NSD_WORKER_CURVE_KEY", default=None, type=click.Path(dir_okay=False),
              help="This worker's key pair, allowed on the broker as a worker (env NSD_WORKER_CURVE_KEY).")
@click.option("--server-key", envvar="NSD_WORKER_SERVER_KEY", default=None, type=click.Path(dir_okay=False),
              help="The broker's public key (env NSD_WORKER_SERVER_KEY).")
@click.option("--shared-dir", "shared_dirs", multiple=True, type=click.Path(file_okay=False),
              default=WORKER.shared_dirs, help="A shared-filesystem folder runners may read (model.shared = true "
                                               "tasks name paths in it); repeat for more. Default: none.")
@click.option("--runner-env", multiple=True, default=WORKER.runner_env,
              help="An environment variable of ours that runners also get (they get only a few: PATH, LANG, "
                   "OMP_*, ...); repeat for more.")
@click.option("--no-sandbox", is_flag=True, default=not WORKER.sandbox,
              help="Run runners without bubblewrap. Development only: a python recipe could then read this "
                   "worker's keys, cache and other tasks' files.")
@click.option("--label", default=WORKER.label,
              help="A kind of machine, e.g. spr-64: tasks with resources.hardware = LABEL run only on such workers.")
@click.option("--log-level", default="info", show_default=True)
def worker(broker_addr, cores, cpus, cores_per_trial, cache_dir, cache_size, worker_id, heartbeat, grace, preload,
           curve_key, server_key, shared_dirs, runner_env, no_sandbox, label, log_level) -> None:
    """Run a worker daemon on this node."""
    from nsd.limits import raise_open_files_limit
    from nsd.net import install_uvloop
    from nsd.worker.daemon import WorkerDaemon, WorkerRefused
    from nsd.worker.sandbox import SandboxError

    setup_logging(log_level)
    raise_open_files_limit()
    install_uvloop()
    from nsd.worker.cores import select_cpus

    try:
        cpus = select_cpus(sorted(os.sched_getaffinity(0)), cores, cpus)
    except ValueError as exc:
        fail(exc)
    if not 1 <= cores_per_trial <= len(cpus):
        fail(ValueError(f"--cores-per-trial must be between 1 and {len(cpus)}"))
    from nsd.spec import HARDWARE_LABEL

    if label is not None and not HARDWARE_LABEL.fullmatch(label):
        fail(ValueError(f"--label must be letters, digits, '.', '_' or '-' (at most 64), got {label[:80]!r}"))
    config = WorkerConfig(broker=broker_addr, cpus=cpus, cores_per_trial=cores_per_trial,
                          worker_id=worker_id, heartbeat_s=heartbeat, grace_s=grace, curve_key=curve_key,
                          server_key=server_key, cache_max_bytes=int(cache_size * 1024**3), preload=preload,
                          shared_dirs=[Path(d) for d in shared_dirs], runner_env=list(runner_env),
                          sandbox=not no_sandbox, label=label)
    if cache_dir is not None:
        config.cache_dir = Path(cache_dir).resolve()  # runners work in their own folders

    try:
        daemon = WorkerDaemon(config)
    except (ValueError, SandboxError) as exc:
        fail(exc)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        await daemon.run()

    try:
        asyncio.run(serve())
    except WorkerRefused as exc:
        fail(exc)


GATEWAY_BOUNDS = {  # GatewayConfig field: (option, help): what one client may hold of the gateway, and for how long
    "header_timeout_s": ("--header-timeout", "Seconds a client has to send each request's head."),
    "body_idle_s": ("--body-idle", "Seconds a request body may send nothing before it is given up (408)."),
    "max_connections": ("--max-connections", "HTTP connections in all (past it: 503)."),
    "max_connections_per_client": ("--max-connections-per-client",
                                   "HTTP connections, and gRPC calls, one address (IPv6: /64) may hold; raise it "
                                   "behind a proxy."),
    "grpc_idle_s": ("--grpc-idle", "Seconds a gRPC connection may carry no call before it is closed."),
    "max_streams": ("--max-streams", "Event streams (SSE, gRPC Watch, /task/screen) in all."),
    "max_streams_per_token": ("--max-streams-per-token", "Event streams one token name may hold open."),
    "events_probe_s": ("--events-probe", "Seconds a followed task may be quiet before its seq is asked for."),
    "broker_connections": ("--broker-connections", "Requests to the broker in flight at once."),
    "broker_timeout_s": ("--broker-timeout", "Seconds to wait for the broker's answer (then 503)."),
}


def _gateway_bounds(command):
    for name, (option, help_text) in reversed(GATEWAY_BOUNDS.items()):
        default = getattr(GATEWAY, name)
        kind = click.IntRange(min=1) if isinstance(default, int) else click.FloatRange(min=0.05)
        command = click.option(option, name, type=kind, default=default, show_default=True, help=help_text)(command)
    return command


@click.command()
@config_option("gateway")
@click.option("--broker", envvar="NSD_BROKER", default=GATEWAY.broker or DEFAULT_ENDPOINTS["clients"],
              show_default=True, help="The broker's client endpoint; a broker pair's two, comma-separated (env NSD_BROKER).")
@click.option("--http", default=GATEWAY.http, show_default=True, help="REST, events and web view: HOST:PORT.")
@click.option("--grpc", default=GATEWAY.grpc, show_default=True, help="gRPC: HOST:PORT.")
@click.option("--tokens", type=click.Path(dir_okay=False), default=GATEWAY.tokens,
              help="Bearer tokens, one `name token [code]` per line (re-read on SIGHUP); required unless --no-auth.")
@click.option("--no-auth", is_flag=True, default=GATEWAY.no_auth,
              help="Development on loopback only: no tokens, one tenant, every right.")
@click.option("--allowed-hosts", multiple=True, default=GATEWAY.allowed_hosts,
              help="A Host name served besides the bind address and loopback (repeat; '*': any, behind a proxy).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=GATEWAY.tls_cert,
              help="TLS certificate (PEM), both doors.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=GATEWAY.tls_key, help="TLS private key (PEM).")
@click.option("--insecure", is_flag=True, default=GATEWAY.insecure, help="Allow a non-loopback bind without TLS.")
@click.option("--max-upload", default=GATEWAY.limits.max_upload / 1024**3, show_default=True,
              help="Largest upload, GiB.")
@_gateway_bounds
@click.option("--curve-key", envvar="NSD_CURVE_KEY", default=GATEWAY.curve_key, type=click.Path(dir_okay=False),
              help="The gateway's own key pair for a CURVE broker, allowed there as a gateway (env NSD_CURVE_KEY).")
@click.option("--server-key", envvar="NSD_SERVER_KEY", default=GATEWAY.server_key, type=click.Path(dir_okay=False),
              help="The broker's public key, for a CURVE broker (env NSD_SERVER_KEY).")
@click.option("--log-level", default="info", show_default=True)
def gateway(broker, http, grpc, tokens, no_auth, allowed_hosts, tls_cert, tls_key, insecure, max_upload,
            curve_key, server_key, log_level, **bounds) -> None:
    """Run the REST + gRPC gateway and web view (needs `pip install 'nsd[gateway]'`)."""
    try:
        from nsd.gateway.server import serve
    except ImportError as exc:
        fail(ImportError(f"the gateway needs its extra: pip install 'nsd[gateway]' ({exc})"))
    from nsd.net import install_uvloop

    setup_logging(log_level)
    install_uvloop()
    config = GatewayConfig(broker=broker, http=http or None, grpc=grpc or None, tokens=tokens, no_auth=no_auth,
                           tls_cert=tls_cert, tls_key=tls_key, insecure=insecure, curve_key=curve_key,
                           server_key=server_key, allowed_hosts=tuple(allowed_hosts),
                           limits=Limits(max_upload=int(max_upload * 1024**3)), **bounds)
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:
        fail(exc)

