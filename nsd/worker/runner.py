"""A runner: one persistent process per slot that runs INC quantize + evaluate, torch side.

Started by the worker daemon as `python -m nsd.worker.runner --cpus 0,1 --workdir DIR`; jobs arrive on
stdin and answers leave on the original stdout (framed msgpack, see `pipe`). Everything else the
process prints — INC's logs, a recipe's prints, a C library's — goes to stderr, the runner's log.

The expensive state of a task (imported recipe, loaded FP32 model, example inputs) is cached between
trials, because a fresh process costs 7–11 s of imports before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from typing import Any, Callable

from nsd.worker import measuring


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpus", required=True, help="comma-separated CPU ids this runner is pinned to")
    parser.add_argument("--workdir", required=True, help="scratch folder (INC writes nc_workspace/ here)")
    args = parser.parse_args()
    cpus = [int(c) for c in args.cpus.split(",")]

    # Keep the protocol stream to ourselves: fd 1 becomes the log, the old stdout the answer pipe.
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    os.makedirs(args.workdir, exist_ok=True)
    os.chdir(args.workdir)
    os.sched_setaffinity(0, cpus)
    os.environ.setdefault("LOGLEVEL", "WARNING")  # INC logs at INFO otherwise; read when INC is imported
    # torch.compile (deployment figures): no pool of compile processes beside us, and its cache in our folder.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), "inductor"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub on these machines
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from nsd.quant import quiet

    quiet.install()  # torch's and torchao's known harmless log lines, out of every job's log
    import torch

    torch.set_num_threads(len(cpus))
    from nsd.worker import pipe

    global INBOX
    jobs = INBOX = pipe.Inbox(sys.stdin.fileno())  # read unbuffered: updates for a running job come on it
    import neural_compressor.torch.quantization  # noqa: F401 - pay INC's import cost before the first job

    preload()
    measuring.exclusive.connect(answers, jobs)
    answers.write(pipe.encode({"ready": True, "pid": os.getpid()}))
    cache = TaskCache()
    while True:
        job = jobs.next_job()
        if job is None:
            return  # the worker closed our stdin: it is done with us
        with job_log(job.get("log")):
            answer = run_job(job, cache)
        answers.write(pipe.encode(answer))


def preload() -> None:
    """Costs a runner pays once, before its first job: the modules the worker names in NSD_RUNNER_PRELOAD
    (`nsd worker --preload transformers`: a recipe's own imports, seconds on its first job otherwise), and
    INC's numba packers compiled — from the worker's on-disk cache (NUMBA_CACHE_DIR) after the first runner
    on this machine compiled them (the same machine code: packing is bit-identical either way)."""
    import importlib

    for name in filter(None, os.environ.get("NSD_RUNNER_PRELOAD", "").split(",")):
        try:
            importlib.import_module(name.strip())
        except ImportError as exc:
            print(f"nsd: could not preload {name}: {exc}", file=sys.stderr, flush=True)
    try:
        from neural_compressor.torch.utils.environ import can_pack_with_numba

        if not can_pack_with_numba():
            return
        import numpy as np
        from neural_compressor.torch.utils.bit_packer import bit_packers
    except ImportError:
        return
    for (bits, compress_bits), pack in bit_packers.items():
        if compress_bits != 32:  # INC packs into int32 (WeightOnlyLinear's default compression_dtype)
            continue
        n_pack = compress_bits // bits
        try:
            if os.environ.get("NUMBA_CACHE_DIR"):
                pack.enable_caching()
            pack(np.zeros((1, n_pack), dtype=np.int32), np.zeros((1, 1), dtype=np.int32), n_pack, 1)
        except Exception as exc:  # a packer that will not compile here: INC compiles (or fails) it itself
            print(f"nsd: numba warm-up of {bits}-bit packing failed: {exc}", file=sys.stderr, flush=True)


class TaskCache:
    """The last task's recipe, FP32 model, example inputs and, for recipes that export (built-in ones), the
    PT2E graph (one task: models can be large)."""

    def __init__(self) -> None:
        self.task_id: str | None = None
        self.recipe = self.model = self.example_inputs = None
        self.exported = self.export_error = None
        self.bench: tuple | None = None  # (benchmark inputs, their names) for deployment figures

    def get(self, task_id: str, spec: dict):
        if self.task_id != task_id:
            from nsd.quant.recipes import load_recipe

            self.task_id = None
            self.recipe = self.model = self.example_inputs = None
            self.exported = self.export_error = self.bench = None
            # Where this worker holds the task's files (fetched blobs, or shared paths), for python recipes.
            for var, path in (("NSD_MODEL_PATH", spec["model"]["path"]), ("NSD_DATA_PATH", spec["recipe"]["data"])):
                if path:
                    os.environ[var] = path
                else:
                    os.environ.pop(var, None)
            recipe = load_recipe(spec)
            self.model = recipe.load_model()
            self.example_inputs = recipe.example_inputs()
            self.recipe, self.task_id = recipe, task_id
        return self.recipe, self.model, self.example_inputs

    def benchmark(self) -> tuple | None:
        """(positional inputs, their names) of the batch deployment figures time; None where the recipe has
        no benchmark_inputs() (a python recipe that defines none)."""
        if self.recipe.benchmark_inputs is None:
            return None
        if self.bench is None:
            inputs = self.recipe.benchmark_inputs()
            inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            names = self.recipe.input_names() if hasattr(self.recipe, "input_names") else None
            self.bench = (inputs, names)
        return self.bench

    def model_for(self, config: dict):
        """The FP32 model a trial of `config` quantizes: the recipe's PT2E export for the configs that need
        one (exported once per task, its failure remembered), else the loaded model as is."""
        from nsd.quant.recipes import needs_export

        if not needs_export(self.recipe, config):
            return self.model
        if self.export_error is not None:
            raise self.export_error
        if self.exported is None:
            try:
                self.exported = self.recipe.export(self.model, self.example_inputs)
            except Exception as exc:
                self.export_error = exc
                raise
        return self.exported


@contextlib.contextmanager
def job_log(path: str | None):
    """Send everything this job prints (Python, INC, C libraries) to its own log file."""
    if not path:
        yield
        return
    sys.stderr.flush()
    runner_log = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(runner_log, 1)
        os.dup2(runner_log, 2)
        os.close(runner_log)


INBOX = None  # this runner's stdin (main): updates for the running job


def run_job(job: dict, cache: TaskCache) -> dict[str, Any]:
    start = time.perf_counter()
    if INBOX is not None:
        INBOX.starting(job)
    if job["kind"] != "warm":  # where it ran, in its log: co-located workers must not share cores
        import torch

        print(f"nsd: {job['kind']} job on cpus {','.join(map(str, sorted(os.sched_getaffinity(0))))} "
              f"(pid {os.getpid()}, {torch.get_num_threads()} torch threads)", flush=True)
    try:
        run = RUNS.get(job["kind"])
        if run is None:
            raise ValueError(f"unknown job kind {job['kind']!r}")
        answer = run(job, cache)
        answer["ok"] = True
    except Exception as exc:  # the traceback goes to the job's log; the answer carries the one-line error
        print("".join(traceback.format_exception(exc)), file=sys.stderr, flush=True)
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    answer["seconds"] = time.perf_counter() - start
    return answer


def plan(job: dict, cache: TaskCache) -> dict[str, Any]:
    """Expand the config set in INC's order: INC's own ConfigLoader, no model needed (every process then
    agrees on the trials and their order). The FP32 baseline is the baseline job's, beside the trials."""
    from nsd.quant.inc import expand

    spec = job["spec"]
    return {"configs": expand(spec["tuning"]["config_set"], spec["tuning"]["max_trials"])}


def baseline(job: dict, cache: TaskCache) -> dict[str, Any]:
    """Evaluate FP32 once; for the fallback search, list each config family's ops and blocks once."""
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    spec = job["spec"]
    recipe, model, _ = cache.get(job["task_id"], spec)
    # INC's autotune evaluates the baseline on a copy, exactly like this.
    answer = {"baseline": _metric(recipe.evaluate(_deepcopy_warp(model)))}
    if spec["tuning"]["strategy"] == "basic":
        answer["ops"] = op_lists([{"config": c} for c in job["families"].values()], cache)
    figures = measuring.fp32_figures(spec, cache)  # FP32's deployment figures (issue 17), with its metric
    if figures is not None:
        answer["figures"] = figures
    return answer


def op_lists(configs: list[dict], cache: TaskCache) -> dict[str, dict]:
    """{family: {"ops": [...], "blocks": [[...]]}} for the families of `configs` that can keep ops in FP32.
    PT2E families list the graph their trials quantize (a built-in recipe's export, or load_model()'s)."""
    from nsd.quant.fallback import FALLBACK_FAMILIES, op_list

    lists: dict[str, dict] = {}
    for entry in configs:
        (family, _), = entry["config"].items()
        if family in FALLBACK_FAMILIES and family not in lists:
            try:
                lists[family] = op_list(family, cache.model, cache.model_for(entry["config"]))
            except Exception as exc:  # its trials report the export failure; the search just skips fallback
                print(f"no op list for {family}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return lists


def trial(job: dict, cache: TaskCache) -> dict[str, Any]:
    """One trial as INC's autotune runs it: quantize a copy of the FP32 model in place, then evaluate —
    stopping early where the job's `rule` allows (see `evaluate_trial`). Deployment figures: measured before
    the evaluation where the job says what to beat (`prune`: a trial that already loses on its figures is not
    evaluated), else after it for a passing trial (or every scored one, `tuning.measure = "all"`). A passing
    trial that may win keeps its saved model (`keep_dir`): the very files that were measured."""
    from neural_compressor.torch.quantization import quantize
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    from nsd.quant.fallback import with_fallback
    from nsd.quant.inc import config_from_dict
    from nsd.quant.unpack import recover_weights

    recipe, _, example_inputs = cache.get(job["task_id"], job["spec"])
    model = cache.model_for(job["config"])  # built-in recipes: the PT2E graph for static/dynamic configs
    # A fresh config object per trial (quantize() mutates it), with the search's FP32 ops on top.
    config = with_fallback(config_from_dict(job["config"]), job.get("fallback") or [])
    t0 = time.perf_counter()
    q_model = quantize(_deepcopy_warp(model), quant_config=config, run_fn=recipe.calibrate, inplace=True,
                       example_inputs=example_inputs)
    t1 = time.perf_counter()
    recover_weights(q_model)  # what INC's first forward would do, at once (nsd.quant.unpack): the same weights
    t2 = time.perf_counter()
    if job["kind"] == "save":
        answer = evaluate_trial(recipe, q_model, None)
        answer.update(quantize_s=t1 - t0, recover_s=t2 - t1, eval_s=time.perf_counter() - t2, model=q_model)
        return answer
    measured = measuring.Measured(job, cache)
    if job.get("prune") and measured.possible:
        from nsd.figures import loses

        figures = measured.take(q_model)
        if loses(figures, job["prune"]):
            print("nsd: not evaluated: its figures lose to a passing trial's by more than the margin", flush=True)
            measured.discard()
            return {"metric": None, "pruned": True, "figures": figures, "quantize_s": t1 - t0}
        t2 = time.perf_counter()
    # `rule`: what passing means (sign, need), and whether the trial may stop early once it cannot pass. A
    # trial that started before the baseline was known has none: it learns it while it evaluates, if it comes.
    goal = job.get("rule")
    stop = goal if job["kind"] == "trial" and goal and goal.get("stop", True) else None
    later = (lambda: INBOX.rule(job)) if job["kind"] == "trial" and goal is None and INBOX is not None else None
    answer = evaluate_trial(recipe, q_model, stop, later)
    goal = goal or (later and later())
    answer.update(quantize_s=t1 - t0, recover_s=t2 - t1, eval_s=time.perf_counter() - t2)
    passed = answer["metric"] is not None and _meets(answer["metric"], goal)
    mode = job["spec"]["tuning"].get("measure", "passing")
    if measured.possible and (passed and mode != "none" or mode == "all" and answer["metric"] is not None):
        answer["figures"] = measured.take(q_model)
    if job.get("keep_dir") and passed:
        answer["kept"] = measured.keep(q_model, answer["metric"])
    measured.discard()
    return answer


def evaluate_trial(recipe, q_model, rule: dict | None, later: Callable[[], dict | None] | None = None) \
        -> dict[str, Any]:
    """The trial's metric; or, once its best reachable metric cannot meet the goal (`rule`, from
    `nsd.broker.objective.First.stop_rule`), no metric and the interval it stopped with (`stopped_early`,
    `low`/`high`: None where unbounded, `bound`: the best end). Recipes with evaluate_steps give the same
    metric either way (nsd.quant.scoring)."""
    if recipe.evaluate_steps is None:
        return {"metric": _metric(recipe.evaluate(q_model))}
    from nsd.quant.scoring import reachable, run_steps

    metric, stopped, batches = run_steps(recipe.evaluate_steps(q_model), rule, later)
    if metric is None:
        rule = rule or later()
        low, high = stopped
        bound = reachable(low, high, rule["sign"])
        print(f"nsd: stopped early after {batches} evaluation batches: metric in [{low!r}, {high!r}]", flush=True)
        return {"metric": None, "stopped_early": True, "bound": bound, "batches": batches,
                "low": low if math.isfinite(low) else None, "high": high if math.isfinite(high) else None}
    return {"metric": _metric(metric), "batches": batches}


def _meets(metric: float, rule: dict | None) -> bool:
    return bool(rule) and rule["sign"] * metric >= rule["need"]


def write_model(q_model, folder: str, job: dict, cache: TaskCache, metric: float) -> None:
    """The quantized model saved into `folder` in its deployed form (nsd.quant.deploy), beside nsd.json."""
    from nsd.quant import deploy

    deploy.write_artifact(q_model, folder, job["config"], cache.example_inputs)
    deploy.describe(folder, job, metric, None)


def kept_model(job: dict) -> tuple[str, float] | None:
    """The model this trial kept, if the save job names one that is here and describes the same trial."""
    import json

    folder = job.get("kept")
    try:
        with open(os.path.join(folder, "nsd.json")) as f:
            about = json.load(f)
    except (TypeError, OSError, ValueError):
        return None
    if (about.get("task_id"), about.get("trial"), about.get("config"), about.get("fallback")) != (
            job["task_id"], job["index"], job["config"], list(job.get("fallback") or [])):
        return None
    return folder, about["metric"]


def save(job: dict, cache: TaskCache) -> dict[str, Any]:
    """The winner's model, saved with INC's `save` beside a description, as a folder the worker uploads: the
    one its trial kept where that is on this worker (no second quantization), else quantized again — and
    then its metric is measured again, so that a reader can check it matches the trial's."""
    import shutil
    import tempfile

    folder = os.path.join(tempfile.mkdtemp(prefix="artifact-", dir=os.getcwd()), "model")
    kept = kept_model(job)
    if kept is not None:
        shutil.copytree(kept[0], folder)
        print(f"nsd: reused the model kept by trial {job['index']} (not quantized again)", flush=True)
        return {"artifact_dir": folder, "metric": kept[1], "requantized": False}
    answer = trial(job, cache)
    q_model = answer.pop("model")
    write_model(q_model, folder, job, cache, answer["metric"])
    print(f"nsd: quantized trial {job['index']} again for the artifact", flush=True)
    return {"artifact_dir": folder, "metric": answer["metric"], "requantized": True}


def verify(job: dict, cache: TaskCache) -> dict[str, Any]:
    """The saved winner (an INC save folder, job["artifact"]) loaded as a user loads it and evaluated: the
    metric it really has, which the broker compares with the winning trial's (nsd.broker.verification)."""
    import json

    from neural_compressor.torch.quantization import load
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    recipe, model, _ = cache.get(job["task_id"], job["spec"])
    folder = job["artifact"]
    with open(os.path.join(folder, "nsd.json")) as f:
        about = json.load(f)
    if (about.get("config"), about.get("fallback")) != (job["config"], list(job.get("fallback") or [])):
        raise ValueError("the saved model describes another config than the winner's")
    if about.get("weight_only", True):
        q_model = load(folder, original_model=_deepcopy_warp(model))
    else:  # a PT2E graph, loaded as saved
        q_model = load(folder)
    return {"metric": _metric(recipe.evaluate(q_model))}


def warm(job: dict, cache: TaskCache) -> dict[str, Any]:
    """Load the task's recipe and model now, before its first trial (the worker's idea, not the broker's)."""
    cache.get(job["task_id"], job["spec"])
    return {}


# Each job kind (nsd.protocol.JOB_KINDS) and what runs it here.
RUNS = {"plan": plan, "baseline": baseline, "trial": trial, "refine": trial, "save": save, "verify": verify,
        "warm": warm}


def _metric(value: Any) -> float:
    try:
        metric = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"evaluate() must return a number, got {type(value).__name__}") from None
    if not math.isfinite(metric):
        raise ValueError(f"evaluate() returned {metric}, not a finite number")
    return metric


if __name__ == "__main__":
    main()
