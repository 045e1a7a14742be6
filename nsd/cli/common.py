"""What every `nsd` command shares: the --broker/--json options, logging, and one-line errors."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from nsd.protocol import DEFAULT_ENDPOINTS


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
            click.option("--broker", envvar="NSD_BROKER", default=DEFAULT_ENDPOINTS["clients"], show_default=True,
                         help="The broker's client endpoint; a broker pair's two, comma-separated (env NSD_BROKER).")):
        command = decorator(command)
    return command


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def setup_logging(level: str) -> None:
    # Under systemd (JOURNAL_STREAM set) the journal stamps the time already.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def open_client(broker: str):
    from nsd.client import Client

    meta = click.get_current_context().meta
    return Client(broker, curve_key=meta.get("nsd.curve_key"), server_key=meta.get("nsd.server_key"))


def fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


class Errors:
    """Turn the errors a person can fix into one clear line and exit code 1, not a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from nsd.client import BrokerError, BrokerUnavailable
        from nsd.spec import SpecError

        if exc is not None and isinstance(exc, (BrokerError, BrokerUnavailable, SpecError, FileNotFoundError,
                                                FileExistsError, ValueError)):
            fail(exc)
