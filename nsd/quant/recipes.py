"""Recipes: how a runner gets a model, calibrates it and scores it.

A python recipe is a user file with INC 3.x's own run_fn/eval_fn contract:
`load_model()`, `example_inputs()`, `calibrate(model)`, `evaluate(model) -> float`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REQUIRED = ("load_model", "example_inputs", "calibrate", "evaluate")


@dataclass
class Recipe:
    load_model: Callable[[], Any]
    example_inputs: Callable[[], Any]
    calibrate: Callable[[Any], None]
    evaluate: Callable[[Any], float]


def load_python_recipe(path: str) -> Recipe:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist on this worker (is the path on a shared "
                                f"filesystem?)")
    # A unique module name per file content: two tasks' recipes never collide in one runner.
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    name = f"nsd_recipe_{digest}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise AttributeError(f"recipe {path} does not define {', '.join(missing)} (a python recipe defines "
                             f"{', '.join(REQUIRED)})")
    return Recipe(*(getattr(module, f) for f in REQUIRED))


def load_recipe(spec: dict) -> Recipe:
    recipe = spec["recipe"]
    if recipe["kind"] == "python":
        return load_python_recipe(recipe["file"])
    raise ValueError(f"recipe kind {recipe['kind']!r} is not supported by this worker")
