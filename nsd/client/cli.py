"""The `nsd` command line. `--json` output is the broker's task view as is (README: "JSON output").

Long module: one click command per verb of `nsd`, each short; they share the output helpers here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from nsd import __version__
from nsd.client.keys_cli import keys as keys_group
from nsd.broker.config import BrokerConfig
from nsd.config import config_option
from nsd.worker.config import WorkerConfig

BROKER, WORKER = BrokerConfig(), WorkerConfig()  # the options' defaults are these (one source: the configs)
from nsd.states import TaskState, TrialState

def _remember(ctx: click.Context, param: click.Parameter, value):
    ctx.meta[f"nsd.{param.name}"] = value
    return value


def broker_option(command):
    """--broker, and the CURVE keys a client needs when the broker requires them."""
    for decorator in (
            click.option("--server-key", envvar="NSD_SERVER_KEY", default=None, expose_value=False,
                         callback=_remember, type=click.Path(dir_okay=False),
                         help="The broker's public key, for a CURVE broker (env NSD_SERVER_KEY)."),
            click.option("--curve-key", envvar="NSD_CURVE_KEY", default=None, expose_value=False,
                         callback=_remember, type=click.Path(dir_okay=False),
                         help="Your key pair (nsd keys generate), allowed as a client (env NSD_CURVE_KEY)."),
            click.option("--broker", envvar="NSD_BROKER", default="tcp://127.0.0.1:5550", show_default=True,
                         help="The broker's client endpoint (env NSD_BROKER).")):
        command = decorator(command)
    return command
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _setup_logging(level: str) -> None:
    # Under systemd (JOURNAL_STREAM set) the journal stamps the time already.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _client(broker: str):
    from nsd.client.api import Client

    meta = click.get_current_context().meta
    return Client(broker, curve_key=meta.get("nsd.curve_key"), server_key=meta.get("nsd.server_key"))


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


class _Errors:
    """Turn the errors a person can fix into one clear line and exit code 1, not a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from nsd.client.api import BrokerError, BrokerUnavailable
        from nsd.spec import SpecError

        if exc is not None and isinstance(exc, (BrokerError, BrokerUnavailable, SpecError, FileNotFoundError,
                                                FileExistsError, ValueError)):
            _fail(exc)
        return False


@click.group()
@click.version_option(__version__, prog_name="nsd")
def main() -> None:
    """nsd: INC accuracy-aware quantization tuning across a cluster of CPU nodes."""


def _limit_options(command):
    """One --option per field of BrokerLimits (README "Security" says what each bounds)."""
    from nsd.broker.limits import LIMIT_HELP, BrokerLimits

    defaults = BrokerLimits()
    for name in reversed(BrokerLimits.names()):
        command = click.option(f"--{name.replace('_', '-')}", name, type=click.IntRange(min=1),
                               default=getattr(defaults, name), show_default=True, help=LIMIT_HELP[name])(command)
    return command


@main.command()
@config_option("broker")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where SQLite state lives (default: $XDG_STATE_HOME/nsd/broker).")
@click.option("--clients", default=BROKER.clients, show_default=True, help="Client endpoint to bind.")
@click.option("--workers", default=BROKER.workers, show_default=True, help="Worker endpoint to bind.")
@click.option("--events", default=BROKER.events, show_default=True, help="Event (XPUB) endpoint to bind.")
@click.option("--heartbeat", "heartbeat_s", default=BROKER.heartbeat_s, show_default=True,
              help="Heartbeat interval, seconds (workers adopt it).")
@click.option("--liveness", default=BROKER.liveness, show_default=True,
              help="Missed heartbeats before a worker is dead (workers adopt it).")
@click.option("--insecure", is_flag=True, default=BROKER.insecure,
              help="Allow binding a non-loopback address without CURVE.")
@click.option("--metrics", default=BROKER.metrics, help="Serve Prometheus metrics at HOST:PORT (GET /metrics).")
@click.option("--curve-secret", envvar="NSD_CURVE_SECRET", default=BROKER.curve_secret,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The broker's key pair: turns on CURVE on every socket (env NSD_CURVE_SECRET).")
@click.option("--keys-dir", envvar="NSD_KEYS_DIR", default=BROKER.keys_dir, type=click.Path(file_okay=False, path_type=Path),
              help="Allowlists: KEYS_DIR/workers/*.key and KEYS_DIR/clients/*.key (default STATE_DIR/keys).")
@click.option("--share-cache", is_flag=True, default=BROKER.share_cache,
              help="Reuse cached results across tenants (only those workers allowed with --trusted produced).")
@click.option("--retention-days", type=click.FloatRange(min=0), default=BROKER.retention_days, show_default=True,
              help="Delete finished tasks (and their models, logs, events, cache entries) this many days after "
                   "they end; 0 keeps them.")
@click.option("--tenant-retention", multiple=True, callback=lambda ctx, param, value: _tenant_days(value),
              metavar="TENANT=DAYS", help="retention-days for one tenant (repeatable).")
@click.option("--log-level", default="info", show_default=True)
@_limit_options
def broker(state_dir, log_level, clients, workers, events, heartbeat_s, liveness, insecure, metrics, curve_secret,
           keys_dir, share_cache, retention_days, tenant_retention, **limits) -> None:
    """Run the broker daemon."""
    from nsd.broker.daemon import Broker
    from nsd.broker.limits import BrokerLimits
    from nsd.limits import raise_open_files_limit
    from nsd.net import install_uvloop

    _setup_logging(log_level)
    raise_open_files_limit()  # a descriptor per connected peer
    install_uvloop()
    config = BrokerConfig(clients=clients, workers=workers, events=events, heartbeat_s=heartbeat_s,
                          liveness=liveness, insecure=insecure, metrics=metrics, curve_secret=curve_secret,
                          keys_dir=keys_dir, limits=BrokerLimits(**limits), share_cache=share_cache,
                          retention_days=retention_days, tenant_retention=tenant_retention)
    if state_dir:
        config.state_dir = Path(state_dir)
    try:
        daemon = Broker(config)
    except ValueError as exc:
        _fail(exc)

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


def _tenant_days(values) -> dict[str, float]:
    """--tenant-retention NAME=DAYS (repeatable; a TOML list of such strings)."""
    out = {}
    for value in values:
        name, _, days = str(value).partition("=")
        try:
            out[name.strip()] = float(days)
            if not name.strip() or out[name.strip()] < 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected TENANT=DAYS, e.g. alice=30") from None
    return out


@main.command()
@config_option("worker")
@click.option("--broker", "broker_addr", envvar="NSD_WORKER_BROKER", default=WORKER.broker,
              show_default=True, help="The broker's worker endpoint (env NSD_WORKER_BROKER).")
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
@click.option("--heartbeat", default=WORKER.heartbeat_s, show_default=True,
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
@click.option("--log-level", default="info", show_default=True)
def worker(broker_addr, cores, cpus, cores_per_trial, cache_dir, cache_size, worker_id, heartbeat, grace, preload,
           curve_key, server_key, log_level) -> None:
    """Run a worker daemon on this node."""
    from nsd.limits import raise_open_files_limit
    from nsd.net import install_uvloop
    from nsd.worker.daemon import WorkerDaemon, WorkerRefused

    _setup_logging(log_level)
    raise_open_files_limit()
    install_uvloop()
    from nsd.worker.cores import select_cpus

    try:
        cpus = select_cpus(sorted(os.sched_getaffinity(0)), cores, cpus)
    except ValueError as exc:
        _fail(exc)
    if not 1 <= cores_per_trial <= len(cpus):
        _fail(ValueError(f"--cores-per-trial must be between 1 and {len(cpus)}"))
    config = WorkerConfig(broker=broker_addr, cpus=cpus, cores_per_trial=cores_per_trial,
                          worker_id=worker_id, heartbeat_s=heartbeat, grace_s=grace, curve_key=curve_key,
                          server_key=server_key, cache_max_bytes=int(cache_size * 1024**3), preload=preload)
    if cache_dir is not None:
        config.cache_dir = Path(cache_dir).resolve()  # runners work in their own folders

    try:
        daemon = WorkerDaemon(config)
    except ValueError as exc:
        _fail(exc)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        await daemon.run()

    try:
        asyncio.run(serve())
    except WorkerRefused as exc:
        _fail(exc)


@main.command()
@config_option("gateway")
@click.option("--broker", envvar="NSD_BROKER", default="tcp://127.0.0.1:5550", show_default=True,
              help="The broker's client endpoint (env NSD_BROKER).")
@click.option("--http", default="127.0.0.1:8550", show_default=True, help="REST, events and web view: HOST:PORT.")
@click.option("--grpc", default="127.0.0.1:8551", show_default=True, help="gRPC: HOST:PORT.")
@click.option("--tokens", type=click.Path(dir_okay=False), default=None,
              help="Bearer tokens, one `name token` per line (re-read on SIGHUP); without it nothing is asked.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="TLS certificate (PEM), both doors.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="TLS private key (PEM).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback bind without tokens and TLS.")
@click.option("--max-upload", default=16.0, show_default=True, help="Largest upload, GiB.")
@click.option("--curve-key", envvar="NSD_CURVE_KEY", default=None, type=click.Path(dir_okay=False),
              help="The gateway's own client key pair, for a CURVE broker (env NSD_CURVE_KEY).")
@click.option("--server-key", envvar="NSD_SERVER_KEY", default=None, type=click.Path(dir_okay=False),
              help="The broker's public key, for a CURVE broker (env NSD_SERVER_KEY).")
@click.option("--log-level", default="info", show_default=True)
def gateway(broker, http, grpc, tokens, tls_cert, tls_key, insecure, max_upload, curve_key, server_key,
            log_level) -> None:
    """Run the REST + gRPC gateway and web view (needs `pip install 'nsd[gateway]'`)."""
    try:
        from nsd.gateway.app import Limits
        from nsd.gateway.server import GatewayConfig, serve
    except ImportError as exc:
        _fail(ImportError(f"the gateway needs its extra: pip install 'nsd[gateway]' ({exc})"))
    from nsd.net import install_uvloop

    _setup_logging(log_level)
    install_uvloop()
    config = GatewayConfig(broker=broker, http=http or None, grpc=grpc or None, tokens=tokens,
                           tls_cert=tls_cert, tls_key=tls_key, insecure=insecure, curve_key=curve_key,
                           server_key=server_key, limits=Limits(max_upload=int(max_upload * 1024**3)))
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:
        _fail(exc)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--wait", is_flag=True, help="Wait for the task to end and print its result.")
@json_option
@broker_option
def submit(spec, wait, as_json, broker) -> None:
    """Submit a task spec (TOML or JSON); print its id."""
    from nsd.client.view import exit_code, result_text

    with _Errors(), _client(broker) as client:
        task_id = client.submit(spec)
        if not wait:
            _print_json({"task_id": task_id}) if as_json else click.echo(task_id)
            return
        if not as_json:
            click.echo(f"submitted {task_id}", err=True)
        result = client.result(task_id, wait=True)
    _print_json(result) if as_json else click.echo(result_text(result))
    sys.exit(exit_code(result))


@main.command()
@click.argument("task_id")
@json_option
@broker_option
def status(task_id, as_json, broker) -> None:
    """Show one task's state and progress."""
    from nsd.client.view import progress_line

    with _Errors(), _client(broker) as client:
        task = client.status(task_id)
    _print_json(task) if as_json else click.echo(progress_line(task))


@main.command("list")
@json_option
@broker_option
def list_tasks(as_json, broker) -> None:
    """List your tasks (an admin key: every tenant's, with its owner)."""
    with _Errors(), _client(broker) as client:
        tasks = client.list()
        me = client.whoami()["tenant"] if tasks else ""
    if as_json:
        _print_json({"tasks": tasks})
        return
    owners = any(t.get("owner", "") != me for t in tasks)  # an admin's view: whose each task is
    click.echo(f"{'task':<12}  {'state':<10} {'trials':>9}  {'met':<5} " + ("owner        " if owners else "") + "name")
    for t in tasks:
        met = "-" if t["met_goal"] is None else str(t["met_goal"]).lower()
        owner = f"{t.get('owner', '')[:12]:<12} " if owners else ""
        click.echo(f"{t['task_id']:<12}  {t['state']:<10} {t['trials_done']:>4}/{t['trials_total']:<4}  "
                   f"{met:<5} {owner}{t['name']}")


@main.command()
@click.argument("task_id")
@broker_option
def watch(task_id, broker) -> None:
    """Follow a task live until it ends."""
    from nsd.client.view import apply_event, exit_code, progress_line, result_text

    task = None
    with _Errors(), _client(broker) as client:
        for event in client.events(task_id):
            task = apply_event(task, event)
            if event["kind"] == "trial" and TrialState(event["state"]).finished:
                metric = "-" if event["metric"] is None else f"{event['metric']:.6g}"
                tr = task["trials"][event["index"]]
                click.echo(f"  trial {event['index']:>3} {event['state']:<11} metric {metric}  "
                           f"{tr.get('stage', 'config')}: {tr['label']}")
            elif event["kind"] == "stage":
                stages = sorted({t["stage"] for t in event["trials"]})
                click.echo(f"  fallback search: {len(event['trials'])} {'/'.join(stages)} trials added")
            click.echo(progress_line(task))
        task = client.result(task["task_id"])
    click.echo(result_text(task))
    sys.exit(exit_code(task))


@main.command()
@click.argument("task_id")
@broker_option
def cancel(task_id, broker) -> None:
    """Cancel a task (running trials are stopped)."""
    with _Errors(), _client(broker) as client:
        task = client.cancel(task_id)
    click.echo(f"{task['task_id']} {task['state']}")


@main.command()
@click.argument("task_id")
@broker_option
def delete(task_id, broker) -> None:
    """Erase a task: its trials, logs, events, model and cache entries, on the broker and the workers."""
    with _Errors(), _client(broker) as client:
        answer = client.delete(task_id)
    click.echo(f"deleted {answer['task_id']} ({answer['blobs_dropped']} blob(s) erased)")


@main.command()
@click.option("--task", "task_id", default=None, help="Only what was done to this task (its whole id).")
@click.option("--tenant", "owner", default=None, help="Only what was done to this tenant's tasks.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=int, default=None, help="Entries older than this id (the next page).")
@json_option
@broker_option
def audit(task_id, owner, limit, before, as_json, broker) -> None:
    """Who did what to which task, newest first (admin keys)."""
    import datetime

    with _Errors(), _client(broker) as client:
        entries = client.audit(task_id=task_id, owner=owner, limit=limit, before=before)
    if as_json:
        _print_json({"entries": entries})
        return
    for e in entries:
        when = datetime.datetime.fromtimestamp(e["ts"]).isoformat(sep=" ", timespec="seconds")
        click.echo(f"{e['id']:>7} {when}  {e['tenant'] or '-':<12} {e['action']:<12} {e['task_id'] or '-':<12} "
                   f"{e['actor']}" + (f"  ({e['detail']})" if e["detail"] else ""))


@main.group()
def cache() -> None:
    """The broker's metric cache (results reused by later tasks of the same tenant)."""


@cache.command("purge")
@click.option("--task", "task_id", default=None, help="The entries one of your tasks produced.")
@click.option("--worker", default=None, help="The entries one worker produced (admin keys).")
@click.option("--all", "everything", is_flag=True, help="Every entry: yours, or (admin keys) everyone's.")
@broker_option
def cache_purge(task_id, worker, everything, broker) -> None:
    """Drop cached baselines, metrics and models so that they are measured again."""
    if sum(bool(x) for x in (task_id, worker, everything)) != 1:
        _fail(ValueError("give exactly one of --task TASK, --worker WORKER or --all"))
    with _Errors(), _client(broker) as client:
        purged = client.cache_purge(task_id=task_id, worker=worker, all=everything)
    click.echo(f"purged {purged} cache entr{'y' if purged == 1 else 'ies'}")


@main.command()
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="Wait for the task to end first.")
@json_option
@broker_option
def result(task_id, wait, as_json, broker) -> None:
    """Print a task's result: winner, baseline, every trial, timings."""
    from nsd.client.view import exit_code, result_text

    with _Errors(), _client(broker) as client:
        task = client.result(task_id, wait=wait)
    _print_json(task) if as_json else click.echo(result_text(task))
    if TaskState(task["state"]).terminal:
        sys.exit(exit_code(task))


@main.command()
@click.argument("task_id")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write model/, result.json and README.md into.")
@broker_option
def fetch(task_id, output, broker) -> None:
    """Download a finished task's quantized model."""
    with _Errors(), _client(broker) as client:
        path = client.fetch(task_id, output)
    click.echo(f"wrote {path} (load it as {output / 'README.md'} shows)")


@main.command()
@click.argument("task_id")
@click.option("--trial", "trial", default=None, help="One trial's log (an index), or 'plan' / 'save'.")
@json_option
@broker_option
def logs(task_id, trial, as_json, broker) -> None:
    """Print the logs of a task's jobs (what each runner printed while running them)."""
    with _Errors(), _client(broker) as client:
        entries = client.logs(task_id, trial)
    if as_json:
        _print_json({"logs": entries})
        return
    if not entries:
        click.echo("no logs yet (a job's log arrives with its result)", err=True)
    for e in entries:
        click.echo(f"===== {e['job']} (attempt {e['attempt']}, worker {e['worker']}) =====")
        click.echo(e["text"].rstrip("\n"))


@main.command()
@json_option
@broker_option
def cluster(as_json, broker) -> None:
    """Show the workers: host, cores, slots, busy slots."""
    with _Errors(), _client(broker) as client:
        workers = client.cluster()
    if as_json:
        _print_json({"workers": workers})
        return
    click.echo(f"{'worker':<24} {'host':<16} {'state':<8} {'cores':>5} {'slots':>5} {'busy':>4} {'seen':>6} "
               f"{'version':<8} running")
    for w in workers:
        click.echo(f"{w['worker_id'][:24]:<24} {w['host'][:16]:<16} {w['state']:<8} {w['cores']:>5} {w['slots']:>5} "
                   f"{w['busy']:>4} {w['last_seen_s']:>5.1f}s {w['version'][:8]:<8} {' '.join(w['running']) or '-'}")
    click.echo(f"{len(workers)} workers, {sum(w['slots'] for w in workers)} slots, "
               f"{sum(w['busy'] for w in workers)} busy")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--workers", "n_workers", default=2, show_default=True, help="Local workers to start.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the quantized model, result.json and README.md into this folder.")
@json_option
@click.option("--log-level", default="warning", show_default=True)
def run(spec, n_workers, output, as_json, log_level) -> None:
    """Run one task on a private local broker and N workers, print its result, exit."""
    from nsd.client.view import apply_event, exit_code, progress_line, result_text
    from nsd.local import run_local
    from nsd.net import install_uvloop

    _setup_logging(log_level)
    install_uvloop()
    if n_workers < 1:
        _fail(ValueError("--workers must be at least 1"))
    view: dict[str, Any] = {}

    def show(event: dict) -> None:
        view["task"] = apply_event(view.get("task"), event)
        shown = ("trial", "stage", "state", "snapshot")
        if not as_json and event["kind"] in shown and view["task"]["trials"] is not None:
            if event["kind"] != "trial" or not TrialState(event["state"]).finished:
                click.echo(progress_line(view["task"]), err=True)

    with _Errors():
        try:
            task = asyncio.run(run_local(spec, workers=n_workers, on_event=show, output=output))
        except RuntimeError as exc:  # every local worker stopped (its reason is in the log above)
            _fail(exc)
    _print_json(task) if as_json else click.echo(result_text(task))
    sys.exit(exit_code(task))


@main.command()
@json_option
def presets(as_json) -> None:
    """The named config sets a spec can use (tuning.preset = NAME), with their INC configs."""
    from nsd.presets import PRESETS, config_set

    if as_json:
        _print_json({"presets": [{"name": name, "about": preset["about"], "config_set": config_set(name),
                                  "configs": _preset_size(config_set(name))} for name, preset in PRESETS.items()]})
        return
    for name, preset in PRESETS.items():
        configs = config_set(name)
        click.echo(f"{name}: {preset['about']} ({_preset_size(configs)} configs)")
        for entry in configs:  # TOML, ready to paste into a spec's config_set
            click.echo(f"    {_toml_inline(entry)}")


def _preset_size(configs: list[dict[str, dict[str, Any]]]) -> int:
    """How many configs a set expands into: each entry is the product of its list-valued parameters."""
    import math

    return sum(math.prod(len(v) if isinstance(v, list) else 1 for v in params.values())
               for entry in configs for params in entry.values())


def _toml_inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


main.add_command(keys_group)  # nsd keys generate | allow | revoke | list
