"""Task specs: the schema, defaults and validation. Pure: reading the file is the caller's job.

A spec is a TOML or JSON document (see README "Task spec"). `validate` turns the parsed document into
a `TaskSpec` or raises `SpecError` naming every field that is wrong, so that `nsd submit` can refuse a
bad task before anything is queued.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, TypeVar

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


def default_metric(kind: str) -> str | None:
    """The metric a built-in recipe scores where the spec names none: the first of its row above."""
    metrics = BUILTIN_RECIPES.get(kind, ())
    return metrics[0] if metrics else None


# tuning.objective: "first" is INC's answer (the lowest passing trial); the others rank the passing trials by
# their deployment figures (nsd/figures.py), alone or weighted (INC 2.x's form: { latency = 0.7, size = 0.3 }).
FIGURE_OBJECTIVES = ("latency", "throughput", "memory", "size")
OBJECTIVES = ("first", *FIGURE_OBJECTIVES)
MEASURE = ("passing", "all", "none")  # tuning.measure: which trials get deployment figures (with the baseline)
HARDWARE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a worker's --label, resources.hardware

LOWER_IS_BETTER_METRICS = frozenset({"perplexity"})
CRITERIA = ("relative", "absolute")
STRATEGIES = ("basic", "list")  # tuning.strategy: see nsd/broker/search.py


T = TypeVar("T")


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
    # Deployment figures (nsd/figures.py): which trials are measured, and what picks the winner among passing ones.
    measure: str = "passing"  # passing: the baseline and every trial meeting the goal; all: every scored one; none
    measure_budget_s: float = 3.0  # wall time of timed batches per measured form (after warm-up)
    objective: Any = "first"  # first (INC's answer) | latency | throughput | memory | size | {figure: weight}
    objective_margin: float = 0.05  # figures within this fraction of the best tie; the earliest trial wins ties


@dataclass(frozen=True)
class ResourcesSpec:
    workers: int = 0  # trials at once; 0: as many as there are free slots
    cores_per_trial: int = 0  # cores each trial runs on (one runner pinned to them); 0: the worker's slot size
    priority: int = 0  # higher is served first; equal priorities share free slots in turns
    hardware: str | None = None  # only workers started with this --label run the task (its figures are theirs)


@dataclass(frozen=True)
class TaskSpec:
    name: str = "task"
    model: ModelSpec = field(default_factory=ModelSpec)
    recipe: RecipeSpec = field(default_factory=RecipeSpec)
    tuning: TuningSpec = field(default_factory=TuningSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        """`to_dict`'s inverse, for a spec validated before (the broker's stored tasks): a field that a spec
        of an older nsd lacks takes its default here, and a field nsd no longer has is dropped."""
        sections = {key: section(**{k: v for k, v in data.get(key, {}).items() if k in section.__dataclass_fields__})
                    for key, section in _SECTIONS.items()}
        return cls(name=data.get("name", cls.name), **sections)


PATH_FIELDS = (("model", "path"), ("recipe", "file"), ("recipe", "data"))  # uploaded unless model.shared


def first_trials(trials: Iterable[T], max_trials: int) -> list[T]:
    """The trials a task runs of its expanded config set: the first `max_trials`, in INC's order. Decided
    here once: a worker's expansion (`nsd.quant.inc.expand`) stops there, and the broker cuts a worker's
    plan with it (a plan from a worker is not trusted to be cut)."""
    return list(itertools.islice(trials, max_trials))


def spec_blob_refs(spec: TaskSpec) -> list[str]:
    """The blob references among a validated spec's path fields."""
    paths = (getattr(getattr(spec, section), key) for section, key in PATH_FIELDS)
    return [path for path in paths if parse_ref(path)]


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
    name = raw.get("name", TaskSpec.name)
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
    m, rs = _Section(parts["model"], ModelSpec, problems), _Section(parts["recipe"], RecipeSpec, problems)
    model = ModelSpec(path=m.opt_str("path"), shared=m.boolean("shared"))
    kind = rs.choice("kind", RECIPE_KINDS)
    metrics = BUILTIN_RECIPES.get(kind, ())
    recipe = RecipeSpec(
        kind=kind,
        file=rs.opt_str("file"),
        data=rs.opt_str("data"),
        metric=rs.choice("metric", metrics, default_metric(kind)) if metrics else None,
        text_column=rs.opt_str("text_column"),
        text_pair_column=rs.opt_str("text_pair_column"),
        label_column=rs.opt_str("label_column"),
        calibration_samples=int(rs.number("calibration_samples", 1, 100_000, integer=True)),
        eval_samples=int(rs.number("eval_samples", 1, 10_000_000, integer=True)),
        seq_len=int(rs.number("seq_len", 1, 1_000_000, integer=True)),
        batch_size=int(rs.number("batch_size", 1, 100_000, integer=True)),
    )
    if kind == "python" and not recipe.file:
        problems.append("recipe.file: required for a python recipe (a .py file defining load_model, "
                        "example_inputs, calibrate and evaluate)")
    if kind == "python" and parts["recipe"].get("metric") is not None:
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
    ts = _Section(t, TuningSpec, problems)
    lower = recipe.metric in LOWER_IS_BETTER_METRICS
    higher_is_better = ts.boolean("higher_is_better", not lower)
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
        tolerable_loss=ts.number("tolerable_loss", 0.0, None),
        criterion=ts.choice("criterion", CRITERIA),
        higher_is_better=higher_is_better,
        max_trials=int(ts.number("max_trials", 1, 100_000, integer=True)),
        strategy=ts.choice("strategy", STRATEGIES),
        timeout_s=ts.number("timeout_s", 0.0, None),
        trial_timeout_s=ts.number("trial_timeout_s", 0.0, None),
        max_attempts=int(ts.number("max_attempts", 1, 100, integer=True)),
        early_stop=ts.boolean("early_stop"),
        cache=ts.boolean("cache"),
        measure=ts.choice("measure", MEASURE),
        measure_budget_s=ts.number("measure_budget_s", 0.0, 3600.0),
        objective=_objective(t.get("objective", TuningSpec.objective), problems),
        objective_margin=ts.number("objective_margin", 0.0, 1.0),
    )
    if tuning.objective != "first" and tuning.measure == "none":
        problems.append(f"tuning.measure: the objective {_objective_text(tuning.objective)} ranks trials by their "
                        f"deployment figures; leave measure out (passing) or set it to all, not none")
    r = _Section(parts["resources"], ResourcesSpec, problems)
    resources = ResourcesSpec(
        workers=int(r.number("workers", 0, 100_000, integer=True)),
        cores_per_trial=int(r.number("cores_per_trial", 0, 4096, integer=True)),
        priority=int(r.number("priority", -1000, 1000, integer=True)),
        hardware=r.opt_str("hardware"),
    )
    if resources.hardware is not None and not HARDWARE_LABEL.fullmatch(resources.hardware):
        problems.append(f"resources.hardware: a worker label (letters, digits, '.', '_', '-'; at most 64), got "
                        f"{resources.hardware[:80]!r}")
    if problems:
        raise SpecError(problems)
    return TaskSpec(name=name.strip(), model=model, recipe=recipe, tuning=tuning, resources=resources)


class _Section:
    """One section of the raw document, read field by field: a value missing there takes its dataclass
    field's default (the one place a default is written); a wrong one is a problem, and the default."""

    def __init__(self, raw: dict, cls: type, problems: list[str]):
        self.raw, self.cls, self.problems = raw, cls, problems
        self.prefix = next(k for k, c in _SECTIONS.items() if c is cls) + "."

    def default(self, key: str) -> Any:
        return self.cls.__dataclass_fields__[key].default

    def opt_str(self, key: str) -> str | None:
        value = _opt_str(self.raw, key, self.prefix, self.problems)
        return self.default(key) if value is None else value

    def boolean(self, key: str, default: bool | None = None) -> bool:
        return _bool(self.raw, key, self.default(key) if default is None else default, self.prefix, self.problems)

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        return _choice(self.raw, key, choices, self.default(key) if default is None else default, self.prefix,
                       self.problems)

    def number(self, key: str, low: float | None, high: float | None, integer: bool = False) -> float:
        return _number(self.raw, key, self.default(key), low, high, self.prefix, self.problems, integer)


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


def _objective(value: Any, problems: list[str]) -> Any:
    """tuning.objective: one of OBJECTIVES, or a table of positive weights over FIGURE_OBJECTIVES."""
    where = "tuning.objective"
    if isinstance(value, str):
        if value in OBJECTIVES:
            return value
        hint = difflib.get_close_matches(value, OBJECTIVES, n=1)
        problems.append(f"{where}: unknown objective {value[:80]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; one of {', '.join(OBJECTIVES)}, or weights such as {{ latency = 0.7, size = 0.3 }}")
        return "first"
    if not isinstance(value, dict) or not value:
        problems.append(f"{where}: must be one of {', '.join(OBJECTIVES)}, or a table of weights over "
                        f"{', '.join(FIGURE_OBJECTIVES)} such as {{ latency = 0.7, size = 0.3 }}")
        return "first"
    weights, ok = {}, True
    for name, weight in value.items():
        if name not in FIGURE_OBJECTIVES:
            hint = difflib.get_close_matches(str(name), FIGURE_OBJECTIVES, n=1)
            problems.append(f"{where}.{str(name)[:80]}: unknown figure" + (f" (did you mean {hint[0]!r}?)" if hint
                            else "") + f"; weights go on {', '.join(FIGURE_OBJECTIVES)}")
            ok = False
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            problems.append(f"{where}.{name}: a weight must be a positive number, got {weight!r}"[:300])
            ok = False
        else:
            weights[name] = float(weight)
    return weights if ok else "first"


def _objective_text(objective: Any) -> str:
    if isinstance(objective, dict):
        return "{ " + ", ".join(f"{k} = {v:g}" for k, v in objective.items()) + " }"
    return repr(objective)


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
