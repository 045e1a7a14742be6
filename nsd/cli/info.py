"""What the cluster offers: `nsd cluster` (its workers) and `nsd presets` (the named config sets)."""

from __future__ import annotations

import json
from typing import Any

import click

from nsd.cli.common import Errors, broker_option, json_option, open_client, print_json


@click.command()
@json_option
@broker_option
def cluster(as_json, broker) -> None:
    """Show the workers (host, cores, slots, busy slots) and, for a broker pair, which broker serves."""
    from nsd.client.view import pair_line

    with Errors(), open_client(broker) as client:
        view = client.cluster_status()
    workers = view["workers"]
    if as_json:
        print_json({"workers": workers, **({"pair": view["pair"]} if view.get("pair") else {})})
        return
    if view.get("pair"):  # a broker pair: who serves, how far behind the other is
        click.echo(pair_line(view["pair"]))
    click.echo(f"{'worker':<24} {'host':<16} {'state':<8} {'cores':>5} {'slots':>5} {'busy':>4} {'seen':>6} "
               f"{'version':<8} running")
    for w in workers:
        click.echo(f"{w['worker_id'][:24]:<24} {w['host'][:16]:<16} {w['state']:<8} {w['cores']:>5} {w['slots']:>5} "
                   f"{w['busy']:>4} {w['last_seen_s']:>5.1f}s {w['version'][:8]:<8} {' '.join(w['running']) or '-'}")
    click.echo(f"{len(workers)} workers, {sum(w['slots'] for w in workers)} slots, "
               f"{sum(w['busy'] for w in workers)} busy")
    kinds = sorted({(hw.get("label") or "-", hw.get("cpu", "?"), " ".join(hw.get("isa") or []) or "-")
                    for hw in (w.get("hardware") for w in workers) if hw})
    for label, cpu, isa in kinds:  # the kinds of machine figures are measured on (resources.hardware = label)
        click.echo(f"  label {label}: {cpu} ({isa})")


@click.command()
@json_option
def presets(as_json) -> None:
    """The named config sets a spec can use (tuning.preset = NAME), with their INC configs."""
    from nsd.presets import PRESETS, config_set

    if as_json:
        print_json({"presets": [{"name": name, "about": preset["about"], "config_set": config_set(name),
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


