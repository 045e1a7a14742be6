"""Task specs on the client side: read a TOML/JSON file (paths from its folder), validate it, and check
that the files it names exist, before anything is sent."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from nsd.blobs import parse_ref
from nsd.spec import PATH_FIELDS, TaskSpec, validate


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML or JSON spec file; relative paths in it are taken from the spec's folder."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path} is not valid {'JSON' if file.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a task spec is a table (a JSON object), not {type(raw).__name__}")
    raw.setdefault("name", file.stem)
    base = file.resolve().parent
    for section, key in PATH_FIELDS:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not os.path.isabs(value):
            raw[section][key] = str((base / value).resolve())
    return raw


def prepare_spec(spec: dict | TaskSpec | str | os.PathLike) -> dict[str, Any]:
    """Validate here, before anything is sent, and check that the files it names exist."""
    if isinstance(spec, (str, os.PathLike)):
        spec = read_spec(spec)
    task = spec if isinstance(spec, TaskSpec) else validate(spec, local_paths=True)  # uploaded after this
    missing = []
    for section, key in PATH_FIELDS:
        where, path = f"{section}.{key}", getattr(getattr(task, section), key)
        if path and not parse_ref(path) and not os.path.exists(path):
            hub = where == "model.path" and not os.path.isabs(path) and path.count("/") <= 1
            missing.append(f"{where}: {path} does not exist" + (
                " (nsd loads models from local folders only; it never downloads from a model hub)" if hub else ""))
    if missing:
        raise FileNotFoundError("invalid task spec:\n" + "\n".join(f"  - {m}" for m in missing))
    return task.to_dict()

