"""Content-addressed keys of what a runner computes, so that nothing is computed twice (pure functions).

A metric depends on: the model, data and recipe files (their blob hashes), the recipe fields that change
how the model is scored, the config (with any fallback ops), and the software that ran it (nsd, INC,
torch versions and a hash of nsd's own runner-side code, as the worker reports them). Two jobs with equal keys give equal answers (INC's RTN,
GPTQ and PT2E are deterministic across processes and thread counts), so the broker answers
the second from its `cache` table:

- `plan_key`: the expanded trial list (also depends on config_set and max_trials);
- `baseline_key`: the FP32 baseline and the op lists of the config families;
- `trial_key`: a trial's metric, or, for a trial that stopped early, the interval it stopped with (reusable
  only where that interval cannot meet the new task's goal either; a refine's full metric replaces it, and
  an interval never replaces a full metric);
- `artifact_key`: the saved winner (a blob), keyed like its trial.
- `figures_key`: deployment figures (the FP32 baseline's, config None; or a trial's), keyed like its trial
  AND by the hardware they were measured on (`hardware_key`: the worker's CPU model, core count and ISA
  features, and the cores the job ran on): a re-tune on the same kind of machine re-answers from them, and
  figures from other hardware are never reused.

Only tasks whose inputs are all blobs are cached: a `shared = true` path can change under the same name.

Every key also holds a *scope* (README "Privacy"): an entry is reused only by tasks of the tenant it was
produced for (`tenant:NAME`), so a hit reveals nothing about other tenants and no tenant's results steer
another's answer. With the broker's `share_cache` on, results that workers allowed with `--trusted`
produce are also written under the `shared` scope, which every tenant reads after its own. The versions a
worker reports are part of the key, never a reason to trust it. Each entry records the task and worker
that produced it, so that `nsd cache purge` and a task's deletion can remove it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from nsd.blobs import parse_ref
from nsd.broker.intervals import stop_interval
from nsd.spec import PATH_FIELDS, TaskSpec, TuningSpec
from nsd.versions import VERSION_KEYS

# Recipe fields that only say where files are: their content enters the key through the blob hash.
_LOCATION_FIELDS = {"file", "data"}


SHARED = "shared"


def tenant_scope(tenant: str) -> str:
    return f"tenant:{tenant}"


def task_basis(spec: TaskSpec, versions: dict | None, scope: str = "") -> dict | None:
    """What every key of this task shares, or None where the task must not be cached."""
    if not spec.tuning.cache or spec.model.shared or not versions:
        return None
    blobs = {}
    for section, key in PATH_FIELDS:
        value = getattr(getattr(spec, section), key)
        if value is None:
            continue
        ref = parse_ref(value)
        if ref is None:  # a plain path: its content is not known to us
            return None
        blobs[f"{section}.{key}"] = ref[0]
    recipe = {k: v for k, v in asdict(spec.recipe).items() if k not in _LOCATION_FIELDS}
    return {"blobs": blobs, "recipe": recipe, "versions": {k: versions.get(k) for k in VERSION_KEYS}, "scope": scope}


def _digest(kind: str, basis: dict, **more: Any) -> str:
    text = json.dumps({"kind": kind, "basis": basis, **more}, sort_keys=True, separators=(",", ":"))
    return f"{kind}:" + hashlib.sha256(text.encode()).hexdigest()


def plan_key(basis: dict, tuning: TuningSpec) -> str:
    return _digest("plan", basis, config_set=tuning.config_set, max_trials=tuning.max_trials,
                   strategy=tuning.strategy)


def baseline_key(basis: dict, tuning: TuningSpec, families: dict) -> str:
    """The FP32 metric depends on the model, data and recipe only; the op lists also on the families (and the
    first config of each: a PT2E family's graph) and on whether the search wants them."""
    return _digest("baseline", basis, families=families, strategy=tuning.strategy)


def trial_key(basis: dict, config: dict, fallback: Any = None) -> str:
    return _digest("trial", basis, config=config, fallback=fallback)


def artifact_key(basis: dict, config: dict, fallback: Any = None) -> str:
    return _digest("artifact", basis, config=config, fallback=fallback)


def hardware_key(hardware: dict | None, cores: int) -> dict | None:
    """What deployment figures depend on besides the model: the CPU, its ISA features, the worker's cores and
    the cores (threads) the figures were measured with. None: a worker that did not say (never cached)."""
    if not hardware:
        return None
    return {"cpu": hardware.get("cpu"), "isa": sorted(hardware.get("isa") or []), "cores": hardware.get("cores"),
            "threads": cores}


def figures_key(basis: dict, hardware: dict, config: dict | None, fallback: Any = None) -> str:
    return _digest("figures", basis, hardware=hardware, config=config, fallback=fallback)


class MetricCache:
    """The broker's cache table (Store.cache_get/cache_put) in terms of tasks, trials and scopes. A task that
    may not be cached (task_basis None) neither reads nor writes. Reads try the task's tenant's scope, then
    (with `share`) the shared one; writes go to the tenant's scope, and (with `share`) to the shared one
    when the worker that produced the result is trusted."""

    def __init__(self, store, clock, share: bool = False):
        self.store, self.clock, self.share = store, clock, share
        self.hits = self.misses = 0

    def read_scopes(self, task) -> list[str]:
        return [tenant_scope(task.owner)] + ([SHARED] if self.share else [])

    def write_scopes(self, task, worker) -> list[str]:
        return [tenant_scope(task.owner)] + ([SHARED] if self.share and getattr(worker, "trusted", False) else [])

    @staticmethod
    def key(kind: str, spec: TaskSpec, versions: dict | None, scope: str, config: dict | None = None,
            fallback: Any = None, hardware: dict | None = None) -> str | None:
        basis = task_basis(spec, versions, scope)
        if basis is None:
            return None
        if kind == "plan":
            return plan_key(basis, spec.tuning)
        if kind == "baseline":  # (config: the families)
            return baseline_key(basis, spec.tuning, config)
        if kind == "figures":
            return figures_key(basis, hardware, config, fallback)
        return (trial_key if kind == "trial" else artifact_key)(basis, config, fallback)

    def _get(self, kind: str, task, versions: dict | None, config: dict | None = None,
             fallback: Any = None, hardware: dict | None = None) -> dict | None:
        if task_basis(task.spec, versions) is None:
            return None
        for scope in self.read_scopes(task):
            found = self.store.cache_get(self.key(kind, task.spec, versions, scope, config, fallback, hardware))
            if found is not None:
                self.hits += 1
                return found
        self.misses += 1
        return None

    def _put(self, kind: str, task, worker, body: dict, config: dict | None = None, fallback: Any = None,
             hardware: dict | None = None) -> None:
        for scope in self.write_scopes(task, worker):
            key = self.key(kind, task.spec, worker.versions, scope, config, fallback, hardware)
            if key is not None:
                self.store.cache_put(key, body, self.clock(), scope, task.id, worker.id)

    def get_plan(self, task, versions: dict | None) -> dict | None:
        return self._get("plan", task, versions)

    def put_plan(self, task, worker, configs: list, baseline: float | None = None, ops=None) -> None:
        """The expanded trial list (with the baseline and ops where the plan had them: before the split)."""
        body = {"configs": configs} if baseline is None else {"baseline": baseline, "configs": configs, "ops": ops}
        self._put("plan", task, worker, body)

    def get_baseline(self, task, versions: dict | None, families: dict) -> dict | None:
        return self._get("baseline", task, versions, families)

    def put_baseline(self, task, worker, families: dict, baseline: float, ops=None) -> None:
        self._put("baseline", task, worker, {"baseline": baseline, "ops": ops}, families)

    def get_trial(self, task, versions: dict | None, config: dict, fallback: Any = None) -> dict | None:
        return self._get("trial", task, versions, config, fallback)

    def put_trial(self, task, worker, config: dict, fallback: Any, metric: float | None,
                  bound: float | None = None, low: float | None = None, high: float | None = None) -> None:
        """A trial's full metric, or the interval it stopped with — which never replaces a full metric, and
        narrows an interval already known (both hold the full metric: so does their intersection)."""
        if metric is not None:
            return self._put("trial", task, worker, {"metric": metric, "bound": bound}, config, fallback)
        sign = 1 if task.spec.tuning.higher_is_better else -1
        for scope in self.write_scopes(task, worker):
            key = self.key("trial", task.spec, worker.versions, scope, config, fallback)
            known = (self.store.cache_get(key) if key is not None else None) or {}
            if key is None or known.get("metric") is not None:
                continue
            _, old_low, old_high = stop_interval(known, sign) or (None, None, None)
            lo = max((v for v in (low, old_low) if v is not None), default=None)
            hi = min((v for v in (high, old_high) if v is not None), default=None)
            self.store.cache_put(key, {"metric": None, "bound": hi if sign > 0 else lo, "low": lo, "high": hi},
                                 self.clock(), scope, task.id, worker.id)

    def get_artifact(self, task, versions: dict | None, config: dict, fallback: Any = None) -> str | None:
        found = self._get("artifact", task, versions, config, fallback)
        return found and found.get("sha256")

    def put_artifact(self, task, worker, config: dict, fallback: Any, sha256: str) -> None:
        self._put("artifact", task, worker, {"sha256": sha256}, config, fallback)

    def get_figures(self, task, versions: dict | None, hardware: dict | None, config: dict | None = None,
                    fallback: Any = None) -> dict | None:
        """{"figures": ... or None} measured on this hardware (hardware_key), or None where not known."""
        return None if hardware is None else self._get("figures", task, versions, config, fallback, hardware)

    def put_figures(self, task, worker, hardware: dict | None, config: dict | None, fallback: Any,
                    figures: dict | None) -> None:
        if hardware is not None:
            self._put("figures", task, worker, {"figures": figures}, config, fallback, hardware)
