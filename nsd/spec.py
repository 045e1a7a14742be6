"""Task specs: the schema, defaults and validation. Pure: reading the file is the caller's job.

A spec is a TOML or JSON document (see README "Task spec"). `validate` turns the parsed document into
a `TaskSpec` or raises `SpecError` naming every field that is wrong, so that `nsd submit` can refuse a
bad task before anything is queued.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from nsd.blobs import parse_ref
from nsd.presets import PRESETS
from nsd.presets import config_set as preset_config_set

# INC 3.10's torch config names (config_registry.get_cls_configs()["torch"]). Kept here as data so that
# the broker can refuse a typo at submit without importing INC; a worker checks parameters for real.
INC_CONFIG_NAMES = (
    "autoround", "awq", "fp8_quant", "gptq", "hqq", "hybrid_gptq", "mixed_precision", "mx_quant",
    "pt2e_dynamic_quant", "rtn", "smooth_quant", "static_quant", "teq",
)
BUILTIN_RECIPES = {  # kind -> (metrics it offers, the default first)
    "text-classification": ("accuracy", "f1"),
    "feature-extraction": ("cosine", "spearman"),
    "causal-lm": ("perplexity",),
}
# INC configs whose algorithm quantizes a PT2E-exported graph (without IPEX), and saves one.
PT2E_CONFIGS = frozenset({"static_quant", "pt2e_dynamic_quant"})
RECIPE_KINDS = ("python", *BUILTIN_RECIPES)
LOWER_IS_BETTER_METRICS = frozenset({"perplexity"})
CRITERIA = ("relative", "absolute")
STRATEGIES = ("basic", "list")  # tuning.strategy: see nsd/broker/search.py


class SpecError(ValueError):
    """An invalid spec; `problems` holds one 'field: what is wrong' line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid task spec:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = None  # a local model folder or file (a Hugging Face folder for built-in recipes)
    shared: bool = False  # true: every path is valid as is on every worker (shared filesystem), nothing uploaded


@dataclass(frozen=True)
class RecipeSpec:
    kind: str = "python"  # python, or a built-in: text-classification, feature-extraction, causal-lm
    file: str | None = None  # python recipe: defines load_model, example_inputs, calibrate, evaluate
    data: str | None = None  # built-in recipes: CSV/JSONL (classification, pairs) or a text file
    metric: str | None = None  # built-in recipes: None picks the kind's default
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    calibration_samples: int = 32
    eval_samples: int = 256
    seq_len: int = 128
    batch_size: int = 16


@dataclass(frozen=True)
class TuningSpec:
    preset: str | None = None  # static, dynamic, woq or auto (nsd/presets.py); expands into config_set
    config_set: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    tolerable_loss: float = 0.01
    criterion: str = "relative"
    higher_is_better: bool = True
    max_trials: int = 100  # INC's TuningConfig default; counts trials over every stage of the search
    strategy: str = "basic"  # "basic": INC 2.x's fallback search after the config set; "list": the set only
    timeout_s: float = 0.0  # 0: no wall-clock budget
    trial_timeout_s: float = 0.0  # 0: none; a trial running longer has its runner killed and ends in error
    max_attempts: int = 3  # a trial whose runner dies this often is marked error
    early_stop: bool = True  # stop evaluating a trial once it can neither meet the goal nor be the best
    cache: bool = True  # reuse baselines and trial metrics already measured on the same inputs (blob inputs only)


@dataclass(frozen=True)
class ResourcesSpec:
    workers: int = 0  # trials at once; 0: as many as there are free slots
    cores_per_trial: int = 0  # cores each trial runs on (one runner pinned to them); 0: the worker's slot size
    priority: int = 0  # higher is served first; equal priorities share free slots in turns


@dataclass(frozen=True)
class TaskSpec:
    name: str
    model: ModelSpec
    recipe: RecipeSpec
    tuning: TuningSpec
    resources: ResourcesSpec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PATH_FIELDS = (("model", "path"), ("recipe", "file"), ("recipe", "data"))  # uploaded unless model.shared


def spec_blob_refs(spec: dict) -> list[str]:
    """The blob references among a validated spec's path fields."""
    return [spec[a][b] for a, b in PATH_FIELDS if parse_ref(spec[a][b])]


_SECTIONS = {"model": ModelSpec, "recipe": RecipeSpec, "tuning": TuningSpec, "resources": ResourcesSpec}


def validate(raw: Any, *, local_paths: bool = False) -> TaskSpec:
    """A TaskSpec from a parsed document, or SpecError listing every problem found.

    What the broker accepts and a worker runs (the default): with model.shared = false, every path field
    is a blob reference (`nsd-blob:<sha256>/<name>`), so that no plain path on the submitter's machine
    reaches a worker as is. `local_paths=True` is the client's check before it uploads those paths."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpecError(["spec: must be a table/object"])
    _unknown(raw, {"name", *_SECTIONS}, "", problems)
    name = raw.get("name", "task")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        problems.append("name: must be a non-empty string of at most 200 characters")
    parts = {}
    for key, cls in _SECTIONS.items():
        section = raw.get(key, {})
        if not isinstance(section, dict):
            problems.append(f"{key}: must be a table/object")
            section = {}
        _unknown(section, set(cls.__dataclass_fields__), f"{key}.", problems)
        parts[key] = section
    model = ModelSpec(
        path=_opt_str(parts["model"], "path", "model.", problems),
        shared=_bool(parts["model"], "shared", False, "model.", problems),
    )
    rp = parts["recipe"]
    kind = _choice(rp, "kind", RECIPE_KINDS, "python", "recipe.", problems)
    metrics = BUILTIN_RECIPES.get(kind, ())
    recipe = RecipeSpec(
        kind=kind,
        file=_opt_str(rp, "file", "recipe.", problems),
        data=_opt_str(rp, "data", "recipe.", problems),
        metric=_choice(rp, "metric", metrics, metrics[0], "recipe.", problems) if metrics else None,
        text_column=_opt_str(rp, "text_column", "recipe.", problems) or "text",
        text_pair_column=_opt_str(rp, "text_pair_column", "recipe.", problems),
        label_column=_opt_str(rp, "label_column", "recipe.", problems) or "label",
        calibration_samples=int(_number(rp, "calibration_samples", 32, 1, 100_000, "recipe.", problems, True)),
        eval_samples=int(_number(rp, "eval_samples", 256, 1, 10_000_000, "recipe.", problems, True)),
        seq_len=int(_number(rp, "seq_len", 128, 1, 1_000_000, "recipe.", problems, True)),
        batch_size=int(_number(rp, "batch_size", 16, 1, 100_000, "recipe.", problems, True)),
    )
    if kind == "python" and not recipe.file:
        problems.append("recipe.file: required for a python recipe (a .py file defining load_model, "
                        "example_inputs, calibrate and evaluate)")
    if kind == "python" and rp.get("metric") is not None:
        problems.append("recipe.metric: a python recipe's evaluate() is its metric; set higher_is_better instead")
    if kind in BUILTIN_RECIPES:
        if not model.path:
            problems.append(f"model.path: required for the {kind} recipe (a local Hugging Face model folder)")
        if not recipe.data:
            problems.append(f"recipe.data: required for the {kind} recipe")
        if recipe.file:
            problems.append(f"recipe.file: only python recipes take a file (this one is {kind})")
    if not model.shared and not local_paths:
        for (section, key), value in zip(PATH_FIELDS, (model.path, recipe.file, recipe.data)):
            if value is not None and parse_ref(value) is None:
                problems.append(f"{section}.{key}: with model.shared = false this must be a blob reference "
                                f"(nsd-blob:<sha256>/<name>), which `nsd submit` makes by uploading the path; "
                                f"got {value[:200]!r} (set model.shared = true for paths every worker can read)")
    t = parts["tuning"]
    lower = recipe.metric in LOWER_IS_BETTER_METRICS
    higher_is_better = _bool(t, "higher_is_better", not lower, "tuning.", problems)
    if lower and higher_is_better:
        problems.append(f"tuning.higher_is_better: {recipe.metric} is lower-is-better; leave it out or set false")
    preset = t.get("preset")
    if preset is not None and preset not in PRESETS:
        problems.append(f"tuning.preset: must be one of {', '.join(PRESETS)}; got {preset!r}")
        preset = None
    if preset is not None and t.get("config_set") not in (None, [], preset_config_set(preset)):
        problems.append("tuning: give either preset or config_set, not both")
        config_set = []
    elif preset is not None:
        config_set = preset_config_set(preset)
    else:
        config_set = _config_set(t.get("config_set"), problems)
    tuning = TuningSpec(
        preset=preset,
        config_set=config_set,
        tolerable_loss=_number(t, "tolerable_loss", 0.01, 0.0, None, "tuning.", problems),
        criterion=_choice(t, "criterion", CRITERIA, "relative", "tuning.", problems),
        higher_is_better=higher_is_better,
        max_trials=int(_number(t, "max_trials", 100, 1, 100_000, "tuning.", problems, integer=True)),
        strategy=_choice(t, "strategy", STRATEGIES, "basic", "tuning.", problems),
        timeout_s=_number(t, "timeout_s", 0.0, 0.0, None, "tuning.", problems),
        trial_timeout_s=_number(t, "trial_timeout_s", 0.0, 0.0, None, "tuning.", problems),
        max_attempts=int(_number(t, "max_attempts", 3, 1, 100, "tuning.", problems, integer=True)),
        early_stop=_bool(t, "early_stop", True, "tuning.", problems),
        cache=_bool(t, "cache", True, "tuning.", problems),
    )
    r = parts["resources"]
    resources = ResourcesSpec(
        workers=int(_number(r, "workers", 0, 0, 100_000, "resources.", problems, integer=True)),
        cores_per_trial=int(_number(r, "cores_per_trial", 0, 0, 4096, "resources.", problems, integer=True)),
        priority=int(_number(r, "priority", 0, -1000, 1000, "resources.", problems, integer=True)),
    )
    if problems:
        raise SpecError(problems)
    return TaskSpec(name=name.strip(), model=model, recipe=recipe, tuning=tuning, resources=resources)


def _unknown(section: dict, known: set[str], prefix: str, problems: list[str]) -> None:
    for key in section:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            problems.append(f"{prefix}{key}: unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _opt_str(section: dict, key: str, prefix: str, problems: list[str]) -> str | None:
    value = section.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        problems.append(f"{prefix}{key}: must be a non-empty string")
        return None
    return value


def _bool(section: dict, key: str, default: bool, prefix: str, problems: list[str]) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        problems.append(f"{prefix}{key}: must be true or false, got {value!r}")
        return default
    return value


def _choice(section: dict, key: str, choices: tuple[str, ...], default: str, prefix: str,
            problems: list[str]) -> str:
    value = section.get(key, default)
    if value not in choices:
        problems.append(f"{prefix}{key}: must be one of {', '.join(choices)}; got {value!r}")
        return default
    return value


def _number(section: dict, key: str, default: float, low: float | None, high: float | None, prefix: str,
            problems: list[str], integer: bool = False) -> float:
    value = section.get(key, default)
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        problems.append(f"{prefix}{key}: must be {kind}, got {value!r}")
        return default
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        problems.append(f"{prefix}{key}: must be {bounds}, got {value!r}")
        return default
    return value


def _config_set(value: Any, problems: list[str]) -> list[dict[str, dict[str, Any]]]:
    where = "tuning.config_set"
    if value is None:
        problems.append(f"{where}: required (or a preset: {', '.join(PRESETS)}): a list of "
                        f"{{config_name = {{param = value or [values]}}}}")
        return []
    if isinstance(value, dict):
        value = [value]  # one config is a set of one, as in INC
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: must be a non-empty list of configs")
        return []
    out = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(f"{at}: must map exactly one INC config name to its parameters, "
                            f"e.g. {{rtn = {{bits = [4, 8]}}}}")
            continue
        (name, params), = entry.items()
        if name not in INC_CONFIG_NAMES:
            hint = difflib.get_close_matches(str(name), INC_CONFIG_NAMES, n=1)
            problems.append(f"{at}: unknown INC config {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else
                            f"; known: {', '.join(INC_CONFIG_NAMES)}"))
            continue
        if not isinstance(params, dict):
            problems.append(f"{at}.{name}: parameters must be a table/object")
            continue
        for param, v in params.items():
            if isinstance(v, list) and not v:
                problems.append(f"{at}.{name}.{param}: an empty list gives no configs to try")
        out.append({name: params})
    return out
