"""INC's own sequential `autotune` against the same task run through nsd, in one process, one command.

    python bench/inc_vs_nsd.py [--spec bench/minilm/task.toml] [--workers 2] [--repeat 1] [--order inc-first]
                               [--one-thread] [--retune-loss X]

(a) INC: `neural_compressor.torch.quantization.autotune` in this process with torch threads = the cores nsd
    uses (`--workers` x 1 core, capped by this machine's CPUs: a user compares against INC on the cores
    they have), on the spec's recipe and config set. Timed from the recipe's import through model load,
    baseline evaluation and every trial up to INC's stop (INC's imports are timed separately: they are
    paid once, before either side runs). `--one-thread` also times INC on one thread (labelled "INC-1t").
(b) nsd: a warm local cluster — a private broker and N in-process worker daemons, one CPU each, each with
    a persistent runner process whose torch + INC imports are done before timing (the "warm cluster" of
    issue 11; no model is loaded) — timed from submit to result. `--cold` times a fresh
    `asyncio.run(nsd.local.run_local(spec, workers=N))` instead, runner start-up included.
(c) re-tune (`--retune-loss`, default twice the spec's tolerable_loss; 0: skip): the same task again with
    that tolerance, through nsd with the broker state of (b) kept (its metric cache), and through INC
    (which has no cache: it tunes again from scratch).

Then the wall times, their ratios (nsd / INC: below 1, nsd is faster), the trials each evaluated, and
whether both picked the same trial with the same config. Exit status 0 when every repetition's winners
agree, 1 otherwise.
"""

from __future__ import annotations

import os

# Before anything imports INC (it reads LOGLEVEL at import) or transformers (no model hub here).
os.environ.setdefault("LOGLEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys

# INC packs RTN weights with numba only where TBB loads, and the loader reads LD_LIBRARY_PATH at process
# start: give this process (INC's side) what nsd's runners get (nsd.worker.sandbox.runner_env), so that
# both sides use numba where it is installed.
_LIB = os.path.join(sys.prefix, "lib")
if os.path.exists(os.path.join(_LIB, "libtbb.so.12")) and _LIB not in os.environ.get("LD_LIBRARY_PATH", ""):
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (_LIB, os.environ.get("LD_LIBRARY_PATH")) if p)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse
import asyncio
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/inc_vs_nsd.py` from a checkout without an install
# nsd's runner processes (`python -m nsd.worker.runner`) must import the same nsd as this process.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

# All of nsd now, at once (not lazily, minutes later), so that the broker, workers and client are one version.
from nsd.client.specs import prepare_spec, read_spec  # noqa: E402
from nsd.local import run_local  # noqa: E402
from nsd.quant.inc import config_from_dict  # noqa: E402


def plain(value: Any) -> Any:
    """A config dict as JSON sees it (INC's to_dict may hold tuples), for comparing the two sides."""
    return json.loads(json.dumps(value))


def short(config: dict) -> str:
    (name, params), = config.items()
    keys = ("bits", "use_sym", "group_size", "dtype")
    return f"{name}(" + ", ".join(f"{k}={params[k]}" for k in keys if k in params) + ")"


class CpuMeter:
    """How busy the machine was during a phase, and how much of that was not us (a noise indicator:
    other people's jobs on a shared 2-core machine distort every figure here)."""

    def __enter__(self) -> CpuMeter:
        self.t0, self.stat0, self.own0 = time.perf_counter(), self._stat(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        total, idle = (b - a for a, b in zip(self.stat0, self._stat()))
        busy = len(os.sched_getaffinity(0)) * (total - idle) / total if total else 0.0
        own = (self._own() - self.own0) / wall if wall > 0 else 0.0
        self.figures = {"busy_cores": busy, "own_cores": own, "others_cores": max(0.0, busy - own)}

    @staticmethod
    def _stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies, idle + iowait

    @staticmethod
    def _own() -> float:
        t = os.times()  # this process, and its children once reaped (run_local reaps its runners)
        return t.user + t.system + t.children_user + t.children_system


# ---- (a) INC's own autotune ------------------------------------------------------------------------------

def import_recipe(path: str):
    """A fresh module each time: a recipe's module-level caches (the FP32 reference) start empty."""
    name = f"bench_recipe_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_inc(spec: dict, threads: int) -> dict[str, Any]:
    import torch
    from neural_compressor.common.base_tuning import TuningConfig
    from neural_compressor.torch.quantization import autotune as autotune_fn

    # The module, not the function of the same name that the package exports over it.
    autotune_module = sys.modules["neural_compressor.torch.quantization.autotune"]

    torch.set_num_threads(threads)
    tuning = spec["tuning"]
    quantize_calls: list[dict[str, Any]] = []  # every quantize() INC made: trials, then a re-quantize
    evals: list[dict[str, Any]] = []  # eval_fn calls: [0] the baseline, [i] trial i (INC counts from 1)
    real_quantize = autotune_module.quantize

    def recording_quantize(model, quant_config, *args, **kwargs):
        # quantize() mutates its config (docs/inc-notes.md): record it as INC chose it, before the call.
        entry = {"config": {quant_config.name: plain(quant_config.to_dict())}, "object": quant_config}
        t0 = time.perf_counter()
        entry["model"] = real_quantize(model, quant_config, *args, **kwargs)
        entry["quantize_s"] = time.perf_counter() - t0
        quantize_calls.append(entry)
        return entry["model"]

    start = time.perf_counter()
    recipe = import_recipe(spec["recipe"]["file"])
    model = recipe.load_model()
    example_inputs = recipe.example_inputs()
    load_s = time.perf_counter() - start

    def eval_fn(q_model) -> float:
        t0 = time.perf_counter()
        metric = float(recipe.evaluate(q_model))
        evals.append({"metric": metric, "eval_s": time.perf_counter() - t0})
        return metric

    tune_config = TuningConfig(config_set=[config_from_dict(e) for e in tuning["config_set"]],
                               tolerable_loss=tuning["tolerable_loss"], max_trials=tuning["max_trials"])
    autotune_module.quantize = recording_quantize
    try:
        best = autotune_fn(model, tune_config=tune_config, eval_fn=eval_fn, run_fn=recipe.calibrate,
                           example_inputs=example_inputs)
    finally:
        autotune_module.quantize = real_quantize
    wall_s = time.perf_counter() - start

    trials = []
    for i, (q, e) in enumerate(zip(quantize_calls, evals[1:])):
        trials.append({"index": i, "config": q["config"], "metric": e["metric"],
                       "seconds": q["quantize_s"] + e["eval_s"]})
    # Which trial INC returned: the model object itself, or, after a re-quantize (max_trials reached
    # with no pass), the trial whose config object INC re-quantized with (its best trial record's).
    chosen = None
    if best is not None:
        hit = next((i for i, q in enumerate(quantize_calls) if q["model"] is best), None)
        if hit is not None and hit < len(trials):
            chosen = hit
        elif hit is not None:
            chosen = next((i for i, q in enumerate(quantize_calls[:len(trials)])
                           if q["object"] is quantize_calls[hit]["object"]), None)
    baseline = evals[0]["metric"] if evals else None
    goal = None if baseline is None else baseline * (1 - tuning["tolerable_loss"])
    quantize_calls.clear()  # the quantized models: free them before the other side runs
    del best, model
    return {"wall_s": wall_s, "load_s": load_s, "baseline": baseline, "trials": trials, "chosen": chosen,
            "met_goal": chosen is not None and goal is not None and trials[chosen]["metric"] >= goal,
            "baseline_eval_s": evals[0]["eval_s"] if evals else None}


# ---- (b) the same spec through nsd ------------------------------------------------------------------------

class WarmCluster:
    """A private broker and N local workers (one CPU each, as run_local splits them), started and warm (runner
    processes up, torch and INC imported) before anything is timed, kept for a repetition's nsd runs: the
    "warm cluster" a user submits to. Its event loop runs in a thread, so that INC's side can run in the main
    thread meanwhile without starving the cluster's heartbeats."""

    def __init__(self, workers: int, state_dir: str):
        import threading

        self.workers, self.dir = workers, Path(state_dir)
        # The recipe's own imports, which INC's side has paid before its timing too (`nsd worker --preload`):
        # transformers for MiniLM, scikit-learn's datasets for digits (seconds each on a first import).
        self.preload = ",".join(m for m in ("transformers", "sklearn.datasets")
                                if importlib.util.find_spec(m.split(".")[0]))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="warm-cluster", daemon=True)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def start(self) -> float:
        t0 = time.perf_counter()
        self.thread.start()
        self.call(self._start())
        return time.perf_counter() - t0

    async def _start(self) -> None:
        from nsd.broker.config import BrokerConfig
        from nsd.broker.daemon import Broker
        from nsd.client.api import AsyncClient
        from nsd.local import sandbox_works, split_cpus
        from nsd.worker.daemon import WorkerConfig, WorkerDaemon

        d = self.dir
        self.broker = Broker(BrokerConfig(state_dir=d / "state", clients=f"ipc://{d}/clients", workers=f"ipc://{d}/workers",
                             events=f"ipc://{d}/events"))
        await self.broker.start()
        sandbox = sandbox_works(d)  # as `nsd run`: sandboxed where bubblewrap works
        self.daemons = [WorkerDaemon(WorkerConfig(broker=self.broker.endpoints["workers"], cpus=cpus,
                                                  cores_per_trial=len(cpus), cache_dir=d / f"worker{i}",
                                                  worker_id=f"local-{i}", preload=self.preload,
                                                  sandbox=sandbox))
                        for i, cpus in enumerate(split_cpus(sorted(os.sched_getaffinity(0)), self.workers))]
        self.running = [asyncio.create_task(daemon.run()) for daemon in self.daemons]
        await asyncio.gather(*(daemon.registered.wait() for daemon in self.daemons))
        await asyncio.gather(*(s.runner.ready() for daemon in self.daemons for s in daemon.slots))
        self.client = AsyncClient(self.broker.endpoints["clients"])

    async def _run(self, spec: dict, on_event) -> dict:
        task_id = await self.client.submit(prepare_spec(spec))
        async for event in self.client.events(task_id):
            on_event(event)
        return await self.client.result(task_id)

    def stop(self) -> None:
        async def _stop() -> None:
            for daemon in self.daemons:
                daemon.stop(grace_s=0)
            await asyncio.gather(*self.running, return_exceptions=True)
            await self.client.close()
            await self.broker.stop()

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def run_nsd(spec: dict, workers: int, verbose: bool, keep_dir: str | None = None,
            cluster: WarmCluster | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    answered: list[float] = []  # when the winner was decided (finalizing): before the save and its verification

    def on_event(event: dict) -> None:
        if event.get("kind") == "state" and event.get("state") in ("finalizing", "done") and not answered:
            answered.append(time.perf_counter() - t_start)
        if not verbose:
            return
        at = time.perf_counter() - t_start
        if event.get("kind") == "trial":
            metric = event.get("metric")
            print(f"    nsd {at:6.2f}s  trial {event.get('index')}: {event.get('state')}"
                  + (f"  metric {metric:.6f}" if isinstance(metric, float) else "")
                  + (f"  interval {event['interval']}" if event.get("interval") and metric is None else "")
                  + (f"  refine {event['refine']}" if event.get("refine") else "")
                  + (f"  on {event['worker']}" if event.get("state") == "running" else ""), flush=True)
        elif event.get("kind") in ("state", "plan", "baseline"):
            print(f"    nsd {at:6.2f}s  {event.get('kind')}: {event.get('state', '')}"
                  f"{' baseline %.6f' % event['baseline'] if event.get('baseline') is not None else ''}",
                  flush=True)

    if cluster is not None:
        result = cluster.call(cluster._run(spec, on_event))
    else:
        result = asyncio.run(run_local(spec, workers=workers, on_event=on_event, keep_dir=keep_dir))
    wall_s = time.perf_counter() - t_start
    return {"wall_s": wall_s, "answer_s": answered[0] if answered else wall_s, "result": result}


# ---- report ---------------------------------------------------------------------------------------------

def compare(inc: dict, nsd: dict) -> dict[str, Any]:
    result = nsd["result"]
    winner = result.get("winner")
    nsd_index = winner["index"] if winner else None
    inc_index = inc["chosen"]
    inc_config = inc["trials"][inc_index]["config"] if inc_index is not None else None
    nsd_config = plain(winner["config"]) if winner else None
    scored = [t for t in result.get("trials", []) if t.get("metric") is not None]
    by_index = {t["index"]: t["metric"] for t in scored}
    deltas = [abs(t["metric"] - by_index[t["index"]]) for t in inc["trials"] if t["index"] in by_index]
    return {
        "inc_index": inc_index, "nsd_index": nsd_index, "inc_config": inc_config, "nsd_config": nsd_config,
        "index_agree": inc_index is not None and inc_index == nsd_index,
        "config_agree": inc_config is not None and inc_config == nsd_config,
        "nsd_state": result.get("state"), "nsd_met_goal": result.get("met_goal"), "nsd_error": result.get("error"),
        "nsd_scored": len(scored),
        "nsd_stopped": sum(bool(t.get("stopped_early")) for t in result.get("trials", [])),
        "nsd_refined": sum(t.get("refine") == "done" for t in result.get("trials", [])),
        # Trials evaluated in full before the first pass (INC: every trial before its pick, when it met the goal).
        "inc_full_before_pass": inc_index if inc["met_goal"] else None,
        "nsd_full_before_pass": (sum(1 for t in result.get("trials", []) if t["index"] < nsd_index
                                     and _evaluated_in_full(t)) if result.get("met_goal") else None),
        "nsd_cached": sum(bool(t.get("cached")) for t in result.get("trials", [])),
        "nsd_cancelled": sum(t.get("state") == "cancelled" for t in result.get("trials", [])),
        "nsd_errors": sum(t.get("state") == "error" for t in result.get("trials", [])),
        "nsd_trial_s": (result.get("timings") or {}).get("trial_s_total"),
        "nsd_plan_s": (result.get("timings") or {}).get("plan_s"),
        "nsd_elapsed_s": (result.get("timings") or {}).get("elapsed_s"),
        "metric_max_delta": max(deltas) if deltas else None,
        "baseline_delta": (None if result.get("baseline") is None or inc["baseline"] is None
                           else abs(result["baseline"] - inc["baseline"])),
        "nsd_winner_metric": winner["metric"] if winner else None,
    }


def print_run(rep: int, order: list[str], inc: dict, nsd: dict, cmp: dict) -> None:
    print(f"\n=== repetition {rep + 1} (ran {' then '.join(order)}) ===")
    print(f"  INC autotune : {inc['wall_s']:7.2f} s  (recipe module + model load {inc['load_s']:.2f} s, "
          f"baseline eval {inc['baseline_eval_s']:.2f} s, {len(inc['trials'])} trials)")
    for t in inc["trials"]:
        print(f"      trial {t['index']:2d}  {short(t['config']):40s} metric {t['metric']:.6f}  {t['seconds']:.2f} s")
    print(f"  nsd run_local: {nsd['wall_s']:7.2f} s  (state {cmp['nsd_state']}, task elapsed "
          f"{_f(cmp['nsd_elapsed_s'])} s, plan {_f(cmp['nsd_plan_s'])} s, per-trial seconds sum "
          f"{_f(cmp['nsd_trial_s'])} s)")
    for t in nsd["result"].get("trials", []):
        metric = f"metric {t['metric']:.6f}" if t.get("metric") is not None else \
            f"stopped <={t['interval'][1]:.4f}" if t.get("interval") and t["interval"][1] is not None else " " * 15
        secs = f"{t['seconds']:.2f} s" if t.get("seconds") is not None else ""
        print(f"      trial {t['index']:2d}  {short(t['config']):40s} {metric}  {t['state']:11s} "
              f"{t.get('worker') or '':8s} {secs}")
    if cmp["nsd_error"]:
        print(f"  nsd error: {cmp['nsd_error']}")


def _evaluated_in_full(trial: dict) -> bool:
    """A full metric, or an early stop only at the last batch (its interval has shrunk to a point)."""
    if trial.get("metric") is not None:
        return True
    low, high = trial.get("interval") or (None, None)
    return low is not None and high is not None and high - low < 1e-6


def _full(cmp: dict) -> str:
    """Trials evaluated in full before the first pass, INC/nsd ("-" where nothing passed)."""
    return f"{_f(cmp['inc_full_before_pass'], 'd')}/{_f(cmp['nsd_full_before_pass'], 'd')}"


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def with_loss(spec: dict, loss: float) -> dict:
    return {**spec, "tuning": {**spec["tuning"], "tolerable_loss": loss}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(HERE / "minilm" / "task.toml"), help="nsd task spec (TOML/JSON)")
    parser.add_argument("--workers", type=int, default=2, help="nsd local workers (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions; the order alternates (default 1)")
    parser.add_argument("--order", choices=("inc-first", "nsd-first"), default="inc-first",
                        help="which side runs first in the first repetition (default inc-first)")
    parser.add_argument("--one-thread", action="store_true", help="also time INC on one torch thread")
    parser.add_argument("--cold", action="store_true",
                        help="time nsd as a fresh `nsd run` (run_local: broker, workers and runner start-up "
                             "included) instead of a warm cluster")
    parser.add_argument("--retune-loss", type=float, default=None,
                        help="re-tune with this tolerable_loss (default: twice the spec's; 0: no re-tune)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="print nsd's trial events as they come")
    args = parser.parse_args(argv)

    spec_path = str(Path(args.spec).resolve())
    spec = prepare_spec(read_spec(spec_path))  # validated, defaults filled in, recipe path absolute
    tuning = spec["tuning"]
    tuning["strategy"] = "list"  # INC 3.x's autotune walks the config set only: compare like with like
    tuning["measure"] = "none"  # nor does it measure deployment figures (issue 17: bench/objective.py does)
    if tuning["criterion"] != "relative" or not tuning["higher_is_better"]:
        print("INC's autotune knows only a relative, higher-is-better goal; this spec asks for "
              f"criterion={tuning['criterion']!r}, higher_is_better={tuning['higher_is_better']}", file=sys.stderr)
        return 2
    ncpu = len(os.sched_getaffinity(0))
    inc_threads = max(1, min(args.workers, ncpu))  # the cores nsd's workers use (one each)
    retune = 2 * tuning["tolerable_loss"] if args.retune_loss is None else args.retune_loss
    print(f"spec {spec_path}: {spec['name']}, tolerable_loss {tuning['tolerable_loss']}, "
          f"max_trials {tuning['max_trials']}; {ncpu} CPUs here, nsd workers {args.workers} x 1 core, "
          f"INC torch threads {inc_threads}" + (f"; re-tune at tolerable_loss {retune}" if retune else ""))

    scratch = Path(tempfile.mkdtemp(prefix="inc-vs-nsd-"))
    old_cwd = os.getcwd()
    os.chdir(scratch)  # INC writes ./nc_workspace/ wherever it runs
    try:
        # Imports are paid once per process, before either side runs, so that every repetition's INC
        # time is alike: torch, INC, and the recipe's own (transformers). nsd's runners pay theirs inside
        # the nsd time (runner start, plan), as a fresh `nsd run` would.
        t0 = time.perf_counter()
        import torch  # noqa: F401
        import neural_compressor.torch.quantization  # noqa: F401
        t1 = time.perf_counter()
        import_recipe(spec["recipe"]["file"])
        import_s = time.perf_counter() - t0
        print(f"imports in this process, paid once and in neither time below: torch + INC {t1 - t0:.2f} s, "
              f"recipe module (its own imports: transformers, ...) {import_s - (t1 - t0):.2f} s", flush=True)

        runs = []
        for rep in range(args.repeat):
            first = args.order.split("-")[0]
            order = ["inc", "nsd"] if (first == "inc") == (rep % 2 == 0) else ["nsd", "inc"]
            if args.one_thread:
                order.append("inc1")
            if retune:
                order += ["nsd-retune", "inc-retune"] if order[0] == "inc" else ["inc-retune", "nsd-retune"]
            state_dir = tempfile.mkdtemp(prefix="nsd-state-", dir=scratch)  # (b) and its re-tune share it
            cluster = None
            if not args.cold:
                cluster = WarmCluster(args.workers, state_dir)
                print(f"[{rep + 1}/{args.repeat}] warm cluster started in {cluster.start():.2f} s (not timed)",
                      flush=True)
            got: dict[str, dict] = {}
            for side in order:
                print(f"[{rep + 1}/{args.repeat}] running {side} ...", flush=True)
                with CpuMeter() as meter:
                    if side == "inc":
                        got[side] = run_inc(spec, inc_threads)
                    elif side == "inc1":
                        got[side] = run_inc(spec, 1)
                    elif side == "inc-retune":
                        got[side] = run_inc(with_loss(spec, retune), inc_threads)
                    elif side == "nsd":
                        got[side] = run_nsd(spec, args.workers, args.verbose, state_dir, cluster)
                    else:
                        got[side] = run_nsd(with_loss(spec, retune), args.workers, args.verbose, state_dir, cluster)
                got[side]["cpu"] = meter.figures
                print(f"[{rep + 1}/{args.repeat}] {side}: {got[side]['wall_s']:.2f} s; cores busy on average: "
                      f"{meter.figures['busy_cores']:.2f}, of which not this benchmark: "
                      f"{meter.figures['others_cores']:.2f}", flush=True)
            if cluster is not None:
                cluster.stop()
            cmp = compare(got["inc"], got["nsd"])
            print_run(rep, order, got["inc"], got["nsd"], cmp)
            run = {"order": order, "inc": got["inc"], "nsd": got["nsd"], "cmp": cmp, "inc1": got.get("inc1")}
            if retune:
                run["retune"] = {"inc": got["inc-retune"], "nsd": got["nsd-retune"],
                                 "cmp": compare(got["inc-retune"], got["nsd-retune"])}
                print_run(rep, ["re-tune"], got["inc-retune"], got["nsd-retune"], run["retune"]["cmp"])
            runs.append(run)
    finally:
        os.chdir(old_cwd)
        shutil.rmtree(scratch, ignore_errors=True)

    # ---- summary table ----
    print("\n" + "=" * 100)
    print(f"SUMMARY  {spec['name']}  ({ncpu}-CPU machine; INC: {inc_threads} torch threads; nsd: {args.workers} "
          f"workers x 1 core)")
    head = (f"{'rep':>3} {'order':>24} {'INC s':>7} {'nsd s':>7} {'nsd/INC':>7} {'answer s':>8} {'ans/INC':>7} {'INC-1t s':>8} {'nsd/INC-1t':>10} "
            f"{'INC trials':>10} {'nsd scored':>10} {'stopped':>7} {'full<pass':>9} {'INC pick':>8} {'nsd pick':>8} "
            f"{'agree':>5} "
            f"{'re INC s':>8} {'re nsd s':>8} {'re nsd/INC':>10} {'re agree':>8} {'others':>11}")
    print(head)
    print("-" * len(head))
    all_agree = True
    for rep, run in enumerate(runs):
        inc, nsd, cmp = run["inc"], run["nsd"], run["cmp"]
        agree = cmp["index_agree"] and cmp["config_agree"]
        all_agree &= agree
        one = run.get("inc1")
        re = run.get("retune")
        re_agree = re is None or (re["cmp"]["index_agree"] and re["cmp"]["config_agree"])
        all_agree &= re_agree
        print(f"{rep + 1:>3} {'>'.join(run['order']):>24} {inc['wall_s']:7.2f} {nsd['wall_s']:7.2f} "
              f"{nsd['wall_s'] / inc['wall_s']:7.2f} {nsd['answer_s']:8.2f} {nsd['answer_s'] / inc['wall_s']:7.2f} "
              f"{_f(one and one['wall_s']):>8} "
              f"{_f(one and nsd['wall_s'] / one['wall_s']):>10} {len(inc['trials']):>10} {cmp['nsd_scored']:>10} "
              f"{cmp['nsd_stopped']:>7} {_full(cmp):>9} {_f(cmp['inc_index'], 'd'):>8} {_f(cmp['nsd_index'], 'd'):>8} "
              f"{'yes' if agree else 'NO':>5} {_f(re and re['inc']['wall_s']):>8} {_f(re and re['nsd']['wall_s']):>8} "
              f"{_f(re and re['nsd']['wall_s'] / re['inc']['wall_s']):>10} {'yes' if re_agree else 'NO':>8} "
              f"{inc['cpu']['others_cores']:5.2f}/{nsd['cpu']['others_cores']:<5.2f}")
    if len(runs) > 1:
        inc_med = statistics.median(r["inc"]["wall_s"] for r in runs)
        nsd_med = statistics.median(r["nsd"]["wall_s"] for r in runs)
        ans_med = statistics.median(r["nsd"]["answer_s"] for r in runs)
        print(f"{'med':>3} {'':>24} {inc_med:7.2f} {nsd_med:7.2f} {nsd_med / inc_med:7.2f} {ans_med:8.2f} "
              f"{ans_med / inc_med:7.2f}")
    last = runs[-1]["cmp"]
    print("-" * len(head))
    print(f"INC s: INC's autotune in this process on {inc_threads} torch threads, warm: torch, INC and the recipe's "
          f"imports ({import_s:.2f} s) were paid before. INC-1t: the same on one thread. nsd s: "
          + ("run_local end to end, its runner processes' start and imports included" if args.cold else
             "submit to result on a warm local cluster (broker and workers started, runners' imports done, "
             "before timing; no model loaded)")
          + ". answer s: until nsd had decided the winner (its metrics final; the task then saves the model and "
          "has another worker verify it, README \"The winner's model is checked\": the rest of nsd s)"
          + f". re: the re-tune at tolerable_loss {retune} "
          f"(nsd with the first run's broker state: its metric cache). others: cores that other processes kept "
          f"busy, on average, during the INC/nsd phase (anything above ~0.1 means the timings are disturbed).")
    inc_number = None if last["inc_index"] is None else last["inc_index"] + 1
    print(f"winner: INC trial {_f(last['inc_index'], 'd')} (INC numbers it {_f(inc_number, 'd')}) "
          f"{short(last['inc_config']) if last['inc_config'] else '(none: INC returned no model)'}; "
          f"nsd trial {_f(last['nsd_index'], 'd')} {short(last['nsd_config']) if last['nsd_config'] else '(none)'}"
          f", met goal: INC {runs[-1]['inc']['met_goal']}, nsd {last['nsd_met_goal']}")
    print(f"config dicts identical: {'yes' if last['config_agree'] else 'NO'}; "
          f"winner metric nsd {_f(last['nsd_winner_metric'], '.6f')}; max |metric difference| over trials both "
          f"evaluated: {_f(last['metric_max_delta'], '.3g')}; baseline difference {_f(last['baseline_delta'], '.3g')}")
    for rep, run in enumerate(runs):
        for what, cmp in (("tune", run["cmp"]), ("re-tune", (run.get("retune") or {}).get("cmp"))):
            if cmp and not (cmp["index_agree"] and cmp["config_agree"]):
                print(f"rep {rep + 1} {what}: winners DIFFER: INC {cmp['inc_index']} {cmp['inc_config']} vs nsd "
                      f"{cmp['nsd_index']} {cmp['nsd_config']}")
    print(f"nsd trials: {last['nsd_scored']} scored, {last['nsd_stopped']} stopped early ({last['nsd_refined']} of "
          f"them refined), {last['nsd_cancelled']} cancelled, {last['nsd_errors']} errors; INC: "
          f"{len(runs[-1]['inc']['trials'])} evaluated. full<pass: trials evaluated in full before the first pass, "
          f"INC/nsd")
    print("RESULT: winners agree" if all_agree else "RESULT: winners DISAGREE")

    if args.json:
        def slim(r: dict) -> dict:
            return {"wall_s": r["wall_s"], "answer_s": r.get("answer_s"), "cpu": r["cpu"],
                    "result": {k: v for k, v in r["result"].items() if k != "spec"}}
        out = [{"order": r["order"], "inc": r["inc"], "inc1": r.get("inc1"), "nsd": slim(r["nsd"]), "cmp": r["cmp"],
                "retune": r.get("retune") and {"inc": r["retune"]["inc"], "nsd": slim(r["retune"]["nsd"]),
                                               "cmp": r["retune"]["cmp"]}} for r in runs]
        Path(old_cwd, args.json).write_text(json.dumps({"import_s": import_s, "cpus": ncpu, "workers": args.workers,
                                                        "inc_threads": inc_threads, "retune_loss": retune,
                                                        "spec": spec_path, "runs": out}, indent=2, default=str))
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
