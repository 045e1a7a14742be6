"""The task verbs: submit, status, list, watch, cancel, result, fetch, logs. `--json` output is the
broker's task view as is (README: "JSON output")."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nsd.cli.common import Errors, broker_option, json_option, open_client, print_json
from nsd.states import TaskState, TrialState


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--wait", is_flag=True, help="Wait for the task to end and print its result.")
@json_option
@broker_option
def submit(spec, wait, as_json, broker) -> None:
    """Submit a task spec (TOML or JSON); print its id."""
    from nsd.client.view import exit_code, result_text

    with Errors(), open_client(broker) as client:
        task_id = client.submit(spec)
        if not wait:
            print_json({"task_id": task_id}) if as_json else click.echo(task_id)
            return
        if not as_json:
            click.echo(f"submitted {task_id}", err=True)
        result = client.result(task_id, wait=True)
    print_json(result) if as_json else click.echo(result_text(result))
    sys.exit(exit_code(result))


@click.command()
@click.argument("task_id")
@json_option
@broker_option
def status(task_id, as_json, broker) -> None:
    """Show one task's state and progress."""
    from nsd.client.view import progress_line

    with Errors(), open_client(broker) as client:
        task = client.status(task_id)
    print_json(task) if as_json else click.echo(progress_line(task))


@click.command("list")
@json_option
@broker_option
def list_tasks(as_json, broker) -> None:
    """List your tasks (an admin key: every tenant's, with its owner)."""
    with Errors(), open_client(broker) as client:
        tasks = client.list()
        me = client.whoami()["tenant"] if tasks else ""
    if as_json:
        print_json({"tasks": tasks})
        return
    owners = any(t.get("owner", "") != me for t in tasks)  # an admin's view: whose each task is
    click.echo(f"{'task':<12}  {'state':<10} {'trials':>9}  {'met':<5} " + ("owner        " if owners else "") + "name")
    for t in tasks:
        met = "-" if t["met_goal"] is None else str(t["met_goal"]).lower()
        owner = f"{t.get('owner', '')[:12]:<12} " if owners else ""
        click.echo(f"{t['task_id']:<12}  {t['state']:<10} {t['trials_done']:>4}/{t['trials_total']:<4}  "
                   f"{met:<5} {owner}{t['name']}")


@click.command()
@click.argument("task_id")
@broker_option
def watch(task_id, broker) -> None:
    """Follow a task live until it ends."""
    from nsd.client.view import apply_event, deploy_text, exit_code, progress_line, result_text

    task = None
    with Errors(), open_client(broker) as client:
        for event in client.events(task_id):
            task = apply_event(task, event)
            if event["kind"] == "trial" and TrialState(event["state"]).finished:
                metric = "-" if event["metric"] is None else f"{event['metric']:.6g}"
                tr = task["trials"][event["index"]]
                deployed = f"  {deploy_text(tr['deploy'])}" if tr.get("deploy") else ""
                click.echo(f"  trial {event['index']:>3} {event['state']:<11} metric {metric}{deployed}  "
                           f"{tr.get('stage', 'config')}: {tr['label']}")
            elif event["kind"] == "stage":
                stages = sorted({t["stage"] for t in event["trials"]})
                click.echo(f"  fallback search: {len(event['trials'])} {'/'.join(stages)} trials added")
            click.echo(progress_line(task))
        task = client.result(task["task_id"])
    click.echo(result_text(task))
    sys.exit(exit_code(task))


@click.command()
@click.argument("task_id")
@broker_option
def cancel(task_id, broker) -> None:
    """Cancel a task (running trials are stopped)."""
    with Errors(), open_client(broker) as client:
        task = client.cancel(task_id)
    click.echo(f"{task['task_id']} {task['state']}")


@click.command()
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="Wait for the task to end first.")
@json_option
@broker_option
def result(task_id, wait, as_json, broker) -> None:
    """Print a task's result: winner, baseline, every trial, timings."""
    from nsd.client.view import exit_code, result_text

    with Errors(), open_client(broker) as client:
        task = client.result(task_id, wait=wait)
    print_json(task) if as_json else click.echo(result_text(task))
    if TaskState(task["state"]).terminal:
        sys.exit(exit_code(task))


@click.command()
@click.argument("task_id")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write model/, result.json and README.md into.")
@broker_option
def fetch(task_id, output, broker) -> None:
    """Download a finished task's quantized model."""
    with Errors(), open_client(broker) as client:
        path = client.fetch(task_id, output)
    click.echo(f"wrote {path} (load it as {output / 'README.md'} shows)")


@click.command()
@click.argument("task_id")
@click.option("--trial", "trial", default=None, help="One job's log: a trial (an index), 'plan', 'baseline', 'refine/N' or 'save'.")
@json_option
@broker_option
def logs(task_id, trial, as_json, broker) -> None:
    """Print the logs of a task's jobs (what each runner printed while running them)."""
    with Errors(), open_client(broker) as client:
        entries = client.logs(task_id, trial)
    if as_json:
        print_json({"logs": entries})
        return
    if not entries:
        click.echo("no logs yet (a job's log arrives with its result)", err=True)
    for e in entries:
        click.echo(f"===== {e['job']} (attempt {e['attempt']}, worker {e['worker']}) =====")
        click.echo(e["text"].rstrip("\n"))

