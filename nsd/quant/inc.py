"""INC's config sets, expanded and serialized exactly as INC's own `autotune` sees them."""

from __future__ import annotations

import copy
from typing import Any

from nsd.spec import first_trials


def _registry() -> dict[str, type]:
    import neural_compressor.torch.quantization  # noqa: F401 - registers the torch configs
    from neural_compressor.common.base_config import config_registry

    return config_registry.get_cls_configs()["torch"]


def config_from_dict(entry: dict[str, dict[str, Any]]):
    """An INC config object from nsd's `{name: params}` form (params may hold lists to expand)."""
    (name, params), = entry.items()
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown INC config {name!r}; this INC knows {', '.join(sorted(registry))}")
    # INC mutates configs in quantize(); never hand it the caller's dict.
    return registry[name].from_dict(copy.deepcopy(params))


def label(config, named: set[str] = frozenset()) -> str:
    """A short human name: the parameters the spec named, and any that differ from the defaults."""
    defaults = type(config)().to_dict()
    params = config.to_dict()
    shown = {k: v for k, v in params.items() if not k.startswith("_") and k != "non_tunable_params"
             and (k in named or defaults.get(k) != v)}
    return f"{config.name}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def expand(config_set: list[dict[str, dict[str, Any]]], max_trials: int) -> list[dict[str, Any]]:
    """The ordered trial list INC's `autotune` would walk: its own ConfigLoader (expansion order,
    duplicates skipped), cut at max_trials (`nsd.spec.first_trials`). Each entry: {"config": {name: params},
    "label": str}."""
    from neural_compressor.common.base_tuning import ConfigLoader

    loader = ConfigLoader(config_set=[config_from_dict(entry) for entry in config_set])
    named: dict[str, set[str]] = {}
    for entry in config_set:
        for name, params in entry.items():
            named.setdefault(name, set()).update(params)
    return [{"config": {config.name: _plain(config.to_dict())},
             "label": label(config, named.get(config.name, set()))} for config in first_trials(loader, max_trials)]


def _plain(value: Any) -> Any:
    """INC's to_dict may hold tuples; msgpack and JSON want lists and plain scalars."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
