"""Running one job on a runner (its log, its keep folder, its time limit, the answer the broker gets), the
outbox where answers wait until the broker acknowledges them, and erasing a deleted task's traces."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable

from nsd.worker import checks
from nsd.worker.sandbox import take
from nsd.worker.slots import RunnerDied, RunnerProcess


class Outbox:
    """Results sent and not yet acknowledged, on disk: a restarted worker sends them again with its READY."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
            self._results: dict[str, dict] = data if isinstance(data, dict) else {}  # "trial_id#attempt" -> RESULT
        except (FileNotFoundError, ValueError):
            self._results = {}

    def __bool__(self) -> bool:
        return bool(self._results)

    def results(self) -> list[dict]:
        return list(self._results.values())

    def keep(self, result: dict) -> None:
        self._results[f"{result['trial_id']}#{result['attempt']}"] = result
        self._save()

    def acknowledged(self, trial_id: str, attempt: int) -> None:
        if self._results.pop(f"{trial_id}#{attempt}", None) is not None:
            self._save()

    def forget_task(self, task_id: str) -> None:
        """Drop a deleted task's results (their logs): the broker has erased the task."""
        gone = [key for key in self._results if key.startswith(f"{task_id}/")]
        for key in gone:
            del self._results[key]
        if gone:
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._results))
        os.replace(tmp, self.path)


def erase_task_files(cache_dir: Path, task_id: str) -> None:
    """A deleted task's folders on this worker: its job logs and the models its trials kept."""
    for folder in (cache_dir / "logs" / task_id, cache_dir / "kept" / task_id):
        shutil.rmtree(folder, ignore_errors=True)


class Erasures:
    """DROP (README "Privacy"): a deleted task's blobs, folders and unacknowledged results leave this worker.
    The erased task ids are remembered (the newest 10,000), so that a job of theirs still ending when the
    DROP came leaves nothing behind either (`WorkerDaemon._execute` asks `task_id in erasures`)."""

    def __init__(self, cache_dir: Path, blobs, outbox: Outbox):
        self.cache_dir, self.blobs, self.outbox = cache_dir, blobs, outbox
        self.tasks: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __contains__(self, task_id: str) -> bool:
        return task_id in self.tasks

    def drop(self, blobs: list[str], tasks: list[str]) -> None:
        for sha in blobs:
            self.blobs.drop(sha)
        for task_id in tasks:
            self.tasks[task_id] = None
            self.tasks.move_to_end(task_id)
            erase_task_files(self.cache_dir, task_id)
            self.outbox.forget_task(task_id)
        while len(self.tasks) > 10_000:
            self.tasks.popitem(last=False)
        if blobs or tasks:
            logging.getLogger("nsd.worker").info("erased %d blob(s) and the files of %d task(s) at the broker's "
                                                 "request", len(blobs), len(tasks))


async def run_job(runner: RunnerProcess, trial_id: str, attempt: int, job: dict, cache_dir: Path,
                  upload: Callable[[Path], Awaitable[str]]) -> dict:
    """Run one job on a runner, within its time limit; the answer for the broker, with its log's tail. The
    runner's answer is checked like a peer's (`checks.runner_answer`), and what it made (a kept model, an
    artifact) is taken out of its scratch before the worker uses it (`sandbox.take`)."""
    task_id, _, name = trial_id.partition("/")
    index = name.replace("/", "-")  # "3", "plan", or "<kind>-3": one file name
    kept_dir = cache_dir / "kept"  # passing trials' models, for their save job (runner.keep_model)
    log_path = cache_dir / "logs" / task_id / f"{index}-a{attempt}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.touch()
    job = {**job, "log": str(log_path), "id": trial_id}  # (its id: updates for it name it, nsd.worker.pipe)
    if job.get("kept") and not Path(job["kept"]).resolve().is_relative_to((kept_dir / task_id).resolve()):
        job.pop("kept")  # only a folder this worker kept for this task is uploaded as its artifact
    limit = None
    if job["kind"] in ("trial", "refine") and job["spec"]["tuning"].get("trial_timeout_s"):
        limit = job["spec"]["tuning"]["trial_timeout_s"]
    try:
        # A runner's start-up (a fresh one where another task's recipe ran) is not the trial's time.
        await runner.prepare(task_id)
        if job["kind"] == "trial" and job.get("keep"):
            job["keep_dir"] = str(runner.scratch / KEEP)
        try:
            answer = checks.runner_answer(await asyncio.wait_for(runner.run(job), limit))
        except asyncio.TimeoutError:
            await runner.stop(kill=True)  # a hung trial cannot be interrupted: end its runner
            raise RunnerDied(f"trial exceeded trial_timeout_s={limit:g}s; its runner was killed") from None
        if answer.get("kept"):
            kept = _take_kept(runner, answer.pop("kept"), _keep_dir(kept_dir, task_id, index, attempt))
            answer.update({"kept": kept} if kept else {})
        artifact = answer.pop("artifact_dir", None)
        if job["kind"] == "save" and answer.get("ok"):
            try:
                answer["artifact"] = await _upload_artifact(runner, artifact, cache_dir / "uploads", upload)
            except UploadBroke as exc:  # the connection to the broker, not the job: run it again
                answer = {"ok": False, "requeue": True, "error": f"the artifact's upload failed: {exc}"}
        if job["kind"] == "save":  # the task is decided: models its trials kept here are of no more use
            shutil.rmtree(kept_dir / task_id, ignore_errors=True)
    except RunnerDied as exc:
        answer = {"ok": False, "error": f"{exc} while running {job['kind']} {trial_id}"}
    except (OSError, ValueError, asyncio.TimeoutError) as exc:  # the pipe or an upload broke under us
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    tail = _tail(log_path, LOG_TAIL_BYTES)
    if not answer.get("ok") and tail:
        last = "\n".join(tail.splitlines()[-12:])
        answer["error"] = f"{answer.get('error') or 'failed'}\n--- last lines of its log ---\n{last}"
    answer["log"] = tail
    return answer


class UploadBroke(Exception):
    """The saved model could not be stored on the broker (the connection ended, it refused): not the job's fault."""


KEEP = "kept"  # where in its scratch a runner keeps a passing trial's model (job["keep_dir"])


def _take_kept(runner: RunnerProcess, kept: str, dest: Path) -> str | None:
    """The folder a trial kept, moved out of its runner's scratch to `dest`; None where the runner named
    anything but the folder it was given."""
    if kept != str(runner.scratch / KEEP / "model"):
        return None
    return str(take(runner.scratch, KEEP, dest) / "model")


async def _upload_artifact(runner: RunnerProcess, artifact: str | None, uploads: Path,
                           upload: Callable[[Path], Awaitable[str]]) -> str:
    """Upload the save job's model folder (<scratch>/<folder>/model), taken out of the runner's scratch
    first; packed without following links (a link a recipe planted never takes a file of ours along)."""
    folder = Path(os.path.normpath(artifact or ""))
    if folder.name != "model" or folder.parent.parent != runner.scratch:
        raise ValueError(f"the runner named {str(artifact)[:200]!r} as the saved model, not a folder of its own")
    staged = take(runner.scratch, folder.parent.name, uploads / uuid.uuid4().hex)
    try:
        return await upload(staged / "model")
    except (OSError, ValueError, asyncio.TimeoutError) as exc:
        raise UploadBroke(str(exc) or type(exc).__name__) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _keep_dir(kept_dir: Path, task_id: str, index: str, attempt: int) -> Path:
    """Where a trial that may win keeps its model. The save job of its task removes the task's folder;
    a task whose save ran elsewhere leaves one here, removed once older than KEPT_MAX_AGE_S."""
    now = time.time()
    with contextlib.suppress(OSError):
        for old in kept_dir.iterdir():
            if old.name != task_id and now - old.stat().st_mtime > KEPT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
    return kept_dir / task_id / f"{index}-a{attempt}"


KEPT_MAX_AGE_S = 3600.0  # a kept model whose task's save job never came here
LOG_TAIL_BYTES = 64 * 1024  # of each job's log, sent with its result (the whole log stays on the worker)


def _tail(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


