"""A runner's deployment figures (nsd/figures.py), around `nsd.quant.deploy`: the channel that gives a measuring
runner its worker's machine to itself (`exclusive`), the FP32 figures the baseline job measures once per task, and a
trial's saved and measured model (`Measured`). Torch is imported inside the functions, as in the runner."""

from __future__ import annotations

import contextlib
import os
import sys


class Exclusive:
    """This runner's cores to itself while it times a model (`nsd.worker.slots.RunnerProcess`: the worker pauses
    its other runners): `with exclusive() as paused:` — paused is how many, or None outside a worker."""

    def __init__(self) -> None:
        self.answers = self.jobs = None

    def connect(self, answers, jobs) -> None:
        self.answers, self.jobs = answers, jobs

    @contextlib.contextmanager
    def __call__(self):
        if self.answers is None:
            yield None
            return
        from nsd.worker import pipe

        self.answers.write(pipe.encode({"exclusive": True}))
        reply = self.jobs.next_reply() or {}
        try:
            yield int(reply.get("paused") or 0)
        finally:
            self.answers.write(pipe.encode({"exclusive": False}))
            self.jobs.next_reply()


exclusive = Exclusive()  # the runner's main() connects it to the worker


def fp32_figures(spec: dict, cache) -> dict | None:
    """The FP32 model's deployment figures, once per task (unless tuning.measure = "none"). An objective that
    ranks by figures on a recipe that cannot give a benchmark batch is the task's error, in one line."""
    from nsd.quant import deploy

    tuning = spec["tuning"]
    if tuning.get("measure", "passing") == "none":
        return None
    bench = cache.benchmark()
    if bench is None:
        if tuning.get("objective", "first") != "first":
            raise ValueError(f"tuning.objective = {tuning['objective']!r} ranks trials by deployment figures, "
                             f"but the python recipe defines no benchmark_inputs() (one batch's positional inputs)")
        print("nsd: no deployment figures: the recipe defines no benchmark_inputs()", flush=True)
        return None
    try:
        return deploy.fp32_figures(cache.model, *bench, exclusive, _policy(tuning), os.getcwd())
    except Exception as exc:  # figures are extra: the task goes on without them, the log says why
        print(f"nsd: FP32 deployment figures failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None


def _policy(tuning: dict):
    from nsd.quant.measure import Policy

    return Policy(budget_s=float(tuning.get("measure_budget_s", 3.0)))


class Measured:
    """A trial's saved model and its figures: saved once (where it may be kept: in the keep folder), measured
    once, described once."""

    def __init__(self, job: dict, cache):
        self.job, self.cache = job, cache
        self.possible = job["spec"]["tuning"].get("measure", "passing") != "none" and cache.benchmark() is not None
        self.folder: str | None = None
        self.figures: dict | None = None
        self.kept: str | None = None

    def _save(self, q_model) -> str:
        import tempfile

        from nsd.quant import deploy

        if self.folder is None:
            if self.job.get("keep_dir"):
                import shutil

                shutil.rmtree(self.job["keep_dir"], ignore_errors=True)
                os.makedirs(self.job["keep_dir"])
                self.folder = os.path.join(self.job["keep_dir"], "model")
            else:
                self.folder = os.path.join(tempfile.mkdtemp(prefix="measure-", dir=os.getcwd()), "model")
            deploy.write_artifact(q_model, self.folder, self.job["config"], self.cache.example_inputs)
        return self.folder

    def take(self, q_model) -> dict:
        from nsd.quant import deploy

        if self.figures is None:
            folder = self._save(q_model)
            self.figures = deploy.quantized_figures(folder, self.job["config"], self.cache.model,
                                                    *self.cache.benchmark(), exclusive,
                                                    _policy(self.job["spec"]["tuning"]))
        return self.figures

    def keep(self, q_model, metric: float) -> str:
        """Keep the saved model where the worker told us (keep_dir): if it wins, the save job uploads it instead
        of quantizing (and calibrating) again. The worker discards it otherwise."""
        from nsd.quant import deploy

        folder = self._save(q_model)
        deploy.describe(folder, self.job, metric, self.figures)
        self.kept = folder
        return folder

    def discard(self) -> None:
        """Remove a saved model that is not kept (a scratch folder)."""
        import shutil

        if self.folder is not None and not self.kept:
            shutil.rmtree(os.path.dirname(self.folder), ignore_errors=True)
            self.folder = None
