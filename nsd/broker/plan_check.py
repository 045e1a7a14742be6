"""Is a worker's plan the expansion of the task's config set? What the broker can check without INC (pure).

A plan job's worker expands `tuning.config_set` with INC's ConfigLoader and sends the trial list back
(issue 15: a lease holder must not choose what is tried). INC's expansion is the product of each entry's
list-valued parameters, entry after entry, duplicates skipped. So, without INC, a plan must have:

- every config a member of the set: its name is an entry's, and each parameter the entry names has one
  of the entry's values (a list parameter: one of its items; a scalar: that value);
- no config twice, and at most as many configs as the entries' products add up to;
- the order the spec fixes: entries in turn, and within an entry with one list parameter, its values in
  the list's order (with several, the nesting order is INC's own, and not checked);
- within an entry, the parameters it does not name (INC's defaults) equal across its configs: a worker
  cannot vary what the spec left to INC from one trial to the next.
"""

from __future__ import annotations

import json
import math
from typing import Any


def expansion_size(config_set: list[dict[str, dict[str, Any]]]) -> int:
    return sum(math.prod(len(v) if isinstance(v, list) else 1 for v in params.values())
               for entry in config_set for params in entry.values())


def _matches(params: dict[str, Any], named: dict[str, Any]) -> bool:
    for key, wanted in named.items():
        if key not in params:
            return False
        value = params[key]
        if not (value == wanted or (isinstance(wanted, list) and value in wanted)):
            return False
    return True


def member_of(config_set: list[dict[str, dict[str, Any]]], config: dict[str, Any]) -> int | None:
    """The first entry of the set this config belongs to (INC skips a later duplicate), or None."""
    (name, params), = config.items()
    if not isinstance(params, dict):
        return None
    for i, entry in enumerate(config_set):
        (entry_name, named), = entry.items()
        if entry_name == name and _matches(params, named):
            return i
    return None


def _list_position(named: dict[str, Any], params: dict[str, Any]) -> int | None:
    """Where the config's value stands in its entry's one list parameter (None: not such an entry)."""
    lists = [k for k, v in named.items() if isinstance(v, list)]
    if len(lists) != 1 or params[lists[0]] not in named[lists[0]] or params[lists[0]] == named[lists[0]]:
        return None
    return named[lists[0]].index(params[lists[0]])


def check_plan(config_set: list[dict[str, dict[str, Any]]], configs: list[dict]) -> str | None:
    """None when `configs` (a plan's [{config, label}]) can be the expansion of `config_set`, else why not."""
    if len(configs) > expansion_size(config_set):
        return f"the plan lists {len(configs)} configs; the config set expands to {expansion_size(config_set)}"
    seen: set[str] = set()
    defaults: dict[int, str] = {}
    last_entry, last_position = 0, -1
    for i, item in enumerate(configs):
        config = item["config"]
        key = json.dumps(config, sort_keys=True)
        if key in seen:
            return f"config {i} is listed twice"
        seen.add(key)
        entry = member_of(config_set, config)
        if entry is None:
            return f"config {i} ({key[:200]}) is not in the task's config set"
        if entry < last_entry:
            return f"config {i} is out of order: it belongs to config set entry {entry}, after entry {last_entry}"
        (_, named), = config_set[entry].items()
        (_, params), = config.items()
        position = _list_position(named, params)
        if entry == last_entry and position is not None and position < last_position:
            return f"config {i} is out of order within config set entry {entry}"
        rest = json.dumps({k: v for k, v in params.items() if k not in named}, sort_keys=True)
        if defaults.setdefault(entry, rest) != rest:
            return f"config {i} changes parameters config set entry {entry} leaves to INC"
        if entry != last_entry:
            last_position = -1
        last_entry, last_position = entry, position if position is not None else last_position
    return None
