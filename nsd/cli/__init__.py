"""The `nsd` command (click): one module per command group, wired into `main` here.

The top floor of the house: it may import every other part (client, broker, worker, gateway, local);
nothing imports it (tests/test_layout.py checks the client library's side of that).
"""

from __future__ import annotations

import click

from nsd import __version__
from nsd.cli.daemons import broker, gateway, worker
from nsd.cli.info import cluster, presets
from nsd.cli.keys import keys
from nsd.cli.privacy import audit, cache, delete
from nsd.cli.run import run
from nsd.cli.tasks import cancel, fetch, list_tasks, logs, result, status, submit, watch


@click.group()
@click.version_option(__version__, prog_name="nsd")
def main() -> None:
    """nsd: INC accuracy-aware quantization tuning across a cluster of CPU nodes."""


for command in (broker, worker, gateway,                                         # the daemons
                submit, status, list_tasks, watch, cancel, result, fetch, logs,   # a task
                delete, audit, cache,                                             # privacy
                cluster, presets, run,                                            # the cluster, a local run
                keys):                                                            # CURVE keys
    main.add_command(command)

__all__ = ["main"]
