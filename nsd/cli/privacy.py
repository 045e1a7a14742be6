"""Erasure, the audit log and the metric cache (README "Privacy"): `nsd delete`, `nsd audit`, `nsd cache purge`."""

from __future__ import annotations

import datetime

import click

from nsd.cli.common import Errors, broker_option, json_option, open_client, print_json


@click.command()
@click.argument("task_id")
@broker_option
def delete(task_id, broker) -> None:
    """Erase a task: its trials, logs, events, model and cache entries, on the broker and the workers."""
    with Errors(), open_client(broker) as client:
        answer = client.delete(task_id)
    click.echo(f"deleted {answer['task_id']} ({answer['blobs_dropped']} blob(s) erased)")


@click.command()
@click.option("--task", "task_id", default=None, help="Only what was done to this task (its whole id).")
@click.option("--tenant", "owner", default=None, help="Only what was done to this tenant's tasks.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=int, default=None, help="Entries older than this id (the next page).")
@json_option
@broker_option
def audit(task_id, owner, limit, before, as_json, broker) -> None:
    """Who did what to which task, newest first (admin keys)."""
    with Errors(), open_client(broker) as client:
        entries = client.audit(task_id=task_id, owner=owner, limit=limit, before=before)
    if as_json:
        print_json({"entries": entries})
        return
    for e in entries:
        when = datetime.datetime.fromtimestamp(e["ts"]).isoformat(sep=" ", timespec="seconds")
        click.echo(f"{e['id']:>7} {when}  {e['tenant'] or '-':<12} {e['action']:<12} {e['task_id'] or '-':<12} "
                   f"{e['actor']}" + (f"  ({e['detail']})" if e["detail"] else ""))


@click.group()
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
        raise click.ClickException("give exactly one of --task TASK, --worker WORKER or --all")
    with Errors(), open_client(broker) as client:
        purged = client.cache_purge(task_id=task_id, worker=worker, all=everything)
    click.echo(f"purged {purged} cache entr{'y' if purged == 1 else 'ies'}")
