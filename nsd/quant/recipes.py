"""Recipes: how a runner gets a model, calibrates it and scores it.

A python recipe is a user file with INC 3.x's own run_fn/eval_fn contract:
`load_model()`, `example_inputs()`, `calibrate(model)`, `evaluate(model) -> float`. Its load_model() result
is quantized as is by every config, as INC's autotune does (a recipe wanting PT2E configs exports itself).
The built-in recipes (`nsd.quant.builtin`) add `export`: configs that need a PT2E graph get the exported
model, weight-only configs the plain module. `Recipe` is the protocol both satisfy.

`benchmark_inputs()` (optional) gives the positional inputs of one batch that deployment figures time
(`nsd.quant.deploy`); built-in recipes draw it from their data, a python recipe defines it or gets no figures.

`evaluate_steps(model)` (optional) evaluates in batches and bounds the final metric after each one, so that
a trial that can no longer matter stops early (`nsd.quant.scoring`). Built-in recipes have it for their
bounded metrics; a python recipe opts in with `score_batches(model)` and `SCORE_RANGE` (and, optionally,
`SCORE_COUNT`). Where a recipe has it, a trial's metric is what it returns, with early stopping on or off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from nsd.quant import builtin
from nsd.spec import PT2E_CONFIGS as EXPORTED_CONFIGS  # configs that quantize a PT2E graph, not a module

REQUIRED = ("load_model", "example_inputs", "calibrate", "evaluate")


class Recipe(Protocol):
    """What the runner needs of a recipe. The built-in recipes (`builtin.RECIPES`) satisfy it as classes, a
    python recipe file through `FunctionRecipe`."""

    # Optional: export(model, example_inputs) -> the graph that the configs in EXPORTED_CONFIGS quantize.
    # None: load_model()'s result serves every config (INC's semantics).
    export: Callable[[Any, Any], Any] | None
    # Optional: batched evaluation with bounds (nsd.quant.scoring); None: evaluate() in one go.
    evaluate_steps: Callable[[Any], Any] | None
    # Optional: one batch's positional inputs for deployment figures; None: no figures can be measured.
    benchmark_inputs: Callable[[], Any] | None

    def load_model(self) -> Any: ...

    def example_inputs(self) -> Any: ...

    def calibrate(self, model: Any) -> None: ...

    def evaluate(self, model: Any) -> float: ...


@dataclass
class FunctionRecipe:
    """A Recipe made of plain functions: a python recipe file's (load_python_recipe)."""

    load_model: Callable[[], Any]
    example_inputs: Callable[[], Any]
    calibrate: Callable[[Any], None]
    evaluate: Callable[[Any], float]
    export: Callable[[Any, Any], Any] | None = None
    evaluate_steps: Callable[[Any], Any] | None = None
    benchmark_inputs: Callable[[], Any] | None = None


def needs_export(recipe: Recipe, config: dict[str, Any]) -> bool:
    """Whether a trial of `config` ({name: params}) quantizes the recipe's exported graph, not its model."""
    return recipe.export is not None and any(name in EXPORTED_CONFIGS for name in config)


def load_python_recipe(path: str) -> FunctionRecipe:
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
    recipe = FunctionRecipe(*(getattr(module, f) for f in REQUIRED))
    if callable(getattr(module, "benchmark_inputs", None)):
        recipe.benchmark_inputs = module.benchmark_inputs
    if callable(getattr(module, "score_batches", None)):
        from nsd.quant.scoring import PythonScorer

        recipe.evaluate_steps = PythonScorer(module).steps
    return recipe


def load_recipe(spec: dict) -> Recipe:
    """The recipe a (validated) spec names: a python recipe file, or a built-in recipe."""
    kind = spec["recipe"]["kind"]
    if kind == "python":
        return load_python_recipe(spec["recipe"]["file"])
    if kind in builtin.RECIPES:
        return builtin.RECIPES[kind](spec)
    raise ValueError(f"recipe kind {kind!r} is not supported by this worker")
