"""Daemon configuration files: TOML whose keys are the command's long options (`state_dir`,
`heartbeat`, ...). Precedence: command-line flag, then environment variable where the option has one,
then the file (`--config`, else /etc/nsd/<daemon>.toml when it exists), then the built-in default."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import click

CONFIG_DIR = Path("/etc/nsd")


def default_state_dir() -> Path:
    """The broker's SQLite state, blobs and key allowlists: $XDG_STATE_HOME/nsd/broker."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "nsd" / "broker"


def config_option(daemon: str):
    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        path = Path(value) if value else CONFIG_DIR / f"{daemon}.toml"
        if not value and not path.is_file():
            return None
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise click.BadParameter(f"{path} is not valid TOML: {exc}") from None
        # A key is an option's long name (`broker`, `id`), whatever the parameter is called inside.
        names = {opt.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params if p.name != "config"
                 for opt in getattr(p, "opts", []) if opt.startswith("--")}
        settings = {}
        for key, val in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise click.BadParameter(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
            settings[names[name]] = str(val) if isinstance(val, Path) else val
        ctx.default_map = {**(ctx.default_map or {}), **settings}
        return str(path)

    return click.option("--config", type=click.Path(dir_okay=False), default=None, is_eager=True,
                        expose_value=False, callback=load,
                        help=f"TOML settings (keys: this command's options); default /etc/nsd/{daemon}.toml if present.")
