"""`nsd run`: one task on a private local broker and N workers (nsd/local.py), then a clean exit."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from nsd.cli.common import Errors, fail, json_option, print_json, setup_logging
from nsd.states import TrialState


@click.command()
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

    setup_logging(log_level)
    install_uvloop()
    if n_workers < 1:
        fail(ValueError("--workers must be at least 1"))
    view: dict[str, Any] = {}

    def show(event: dict) -> None:
        view["task"] = apply_event(view.get("task"), event)
        shown = ("trial", "stage", "state", "snapshot")
        if not as_json and event["kind"] in shown and view["task"]["trials"] is not None:
            if event["kind"] != "trial" or not TrialState(event["state"]).finished:
                click.echo(progress_line(view["task"]), err=True)

    with Errors():
        try:
            task = asyncio.run(run_local(spec, workers=n_workers, on_event=show, output=output))
        except RuntimeError as exc:  # every local worker stopped (its reason is in the log above)
            fail(exc)
    print_json(task) if as_json else click.echo(result_text(task))
    sys.exit(exit_code(task))

