"""`nsd keys ...`: CURVE key pairs and the broker's per-role allowlists (nsd/security/keys.py).

Wired into the main command in nsd/cli/__init__.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from nsd import security

keys_dir_option = click.option(
    "--keys-dir", type=click.Path(file_okay=False, path_type=Path), default=None, envvar="NSD_KEYS_DIR",
    help="The broker's allowlists (default: $XDG_STATE_HOME/nsd/broker/keys; env NSD_KEYS_DIR).")
role_option = click.option("--role", type=click.Choice(security.ROLES), required=True,
                           help="worker: may register and run trials; client: may submit and watch its own "
                                "tasks (the key's name is its tenant); gateway: may act for any tenant it "
                                "names; admin: sees every tenant's tasks and the audit log.")


class _KeyErrors:
    """Turn the errors a person can fix into one line on stderr and exit code 1, not a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, (security.KeyFileError, ValueError, FileExistsError, FileNotFoundError,
                            PermissionError)):
            raise click.ClickException(str(exc)) from None
        return False


@click.group()
def keys() -> None:
    """CURVE keys: make key pairs, and choose which keys the broker lets in as workers or clients."""


@keys.command()
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write NAME.key and NAME.key_secret (default: $XDG_CONFIG_HOME/nsd/keys).")
def generate(name: str, directory: Path | None) -> None:
    """Make a key pair: NAME.key (public, give it to the broker) and NAME.key_secret (keep it here)."""
    with _KeyErrors():
        public, secret = security.generate_keypair(directory or security.default_key_dir(), name)
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret} (mode 600: keep it on this machine)")
    click.echo(f"next, on the broker: nsd keys allow --role worker|client|gateway|admin {public.name}")


@keys.command("allow")
@role_option
@click.argument("public_key_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--code", is_flag=True, help="client, gateway, admin: may submit python recipes (code that "
                                           "workers run); built-in recipes need no flag.")
@click.option("--trusted", is_flag=True, help="worker: its results may be reused by every tenant when the "
                                              "broker shares its metric cache (--share-cache).")
@keys_dir_option
def allow_cmd(role: str, public_key_file: Path, code: bool, trusted: bool, keys_dir: Path | None) -> None:
    """Let the holder of PUBLIC_KEY_FILE's key connect to the broker in ROLE (again: set its flags)."""
    with _KeyErrors():
        _, secret = security.read_certificate(public_key_file)
        entry = security.allow(keys_dir or security.default_keys_dir(), role, public_key_file, code=code,
                               trusted=trusted)
    if secret is not None:
        click.echo(f"warning: {public_key_file} holds a SECRET key; only its public key was copied. A secret "
                   f"key belongs on its own machine only.", err=True)
    flags = "".join(f" ({flag})" for flag in sorted(security.read_flags(entry)))
    click.echo(f"allowed {role} key {entry.stem!r}{flags}: {entry}")
    click.echo("new connections use it once the broker reloads its allowlists (SIGHUP) or restarts")


@keys.command("revoke")
@role_option
@click.argument("name")
@keys_dir_option
def revoke_cmd(role: str, name: str, keys_dir: Path | None) -> None:
    """Remove key NAME from a role's allowlist (connections already open stay up until they drop)."""
    with _KeyErrors():
        path = security.revoke(keys_dir or security.default_keys_dir(), role, name)
    click.echo(f"revoked {role} key {name!r} ({path}); restart the broker to drop connections it already let in")


@keys.command("list")
@keys_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(keys_dir: Path | None, as_json: bool) -> None:
    """The keys allowed in each role, with their flags."""
    keys_dir = keys_dir or security.default_keys_dir()
    with _KeyErrors():
        listing = security.list_keys(keys_dir)
    if as_json:
        click.echo(json.dumps({role: [{"name": n, "public_key": k, "flags": f} for n, k, f in rows]
                               for role, rows in listing.items()}, indent=2, sort_keys=True))
        return
    click.echo(f"keys dir: {keys_dir}")
    for role, rows in listing.items():
        if not rows:
            click.echo(f"{role}s: none")
            continue
        click.echo(f"{role}s:")
        width = max(len(name) for name, _, _ in rows)
        for name, key, flags in rows:
            click.echo(f"  {name:<{width}}  {key}" + (f"  ({', '.join(flags)})" if flags else ""))
