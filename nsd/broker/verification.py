"""The winner's model is checked before it is handed out (issue 15): a worker's saved artifact is first a
*candidate*; a `verify` job (on another worker where one is free) loads that INC save folder and measures
its metric again, and only an equal metric (INC's RTN, GPTQ and PT2E are deterministic, so exactly equal)
makes it the task's artifact. A different metric fails the task loudly and purges the cache entries that
could carry the lie: those this task produced and those of the workers that reported the winning metric
and saved the model. A save answered from the metric cache was verified when it was first saved.

A mixin of `nsd.broker.core.Core`; its handlers are named by the `verify` row of `nsd.broker.jobs`.
"""

from __future__ import annotations

import logging

from nsd.blobs import make_ref, parse_ref
from nsd.broker.jobs import VERIFY
from nsd.broker.model import Lease, Task, Worker
from nsd.protocol import JobRef
from nsd.states import TaskState

log = logging.getLogger("nsd.broker")


class Verification:
    def _to_verify(self, task: Task, sha: str, worker: Worker) -> None:
        """A worker saved the winner (bytes it stored): verify them before they are the task's."""
        task.candidate, task.saved_by = make_ref(sha, "model"), worker.id
        task.jobs[JobRef(VERIFY.name)] = Lease()
        self._dirty = True  # the verify job waits for a slot
        self._write_task(task, candidate=task.candidate, jobs=task.jobs_plain())

    def _verify_job(self, task: Task, ref: JobRef, worker: Worker) -> tuple[Worker, dict]:
        if worker.id == task.saved_by:  # another worker reproduces it where one is free (and may run the task)
            label = task.resources.hardware
            other = next((w for w in self.free.values() if w.id != task.saved_by and w is not worker
                          and w.free_cores >= self.job_cores(task, w)
                          and label in (None, (w.hardware or {}).get("label"))), None)
            worker = other or worker
        self._lease_to(task, ref, worker)
        winner = task.trials[task.winner]
        return worker, {"kind": "verify", "task_id": task.id, "spec": task.spec_dict, "index": winner.index,
                        "config": winner.config, "fallback": winner.fallback, "artifact": task.candidate}

    def _verify_result(self, task: Task, ref: JobRef, body: dict, worker: Worker) -> None:
        winner, sha = task.trials[task.winner], parse_ref(task.candidate)[0]
        metric = body.get("metric")
        if not body["ok"]:  # it could not be loaded or evaluated here: not handed out, and said why
            return self._unverified(task, f"the winner's saved model could not be verified: "
                                          f"{(body.get('error') or 'unknown error')[:1000]}")
        if metric == winner.metric:
            self.cache.put_artifact(task, worker, winner.config, winner.fallback, sha)
            return self._hand_out(task, sha)
        suspects = {w for w in (winner.worker, task.saved_by) if w}
        purged = self.store.cache_purge(task_id=task.id) + sum(self.store.cache_purge(worker=w) for w in suspects)
        why = (f"the winner's saved model failed verification: worker {worker.id} measured {metric!r}, the "
               f"winning trial reported {winner.metric!r}; not handed out, and {purged} cache entries of this "
               f"task and of worker(s) {', '.join(sorted(suspects)) or '-'} were purged")
        log.error("task %s: %s", task.id, why)
        task.candidate = None
        self._write_task(task, candidate=None)
        self.finish(task, TaskState.FAILED, winner=task.winner, met_goal=task.met_goal, error=why)

    def _verify_gave_up(self, task: Task, ref: JobRef, attempt: int, why: str) -> None:
        self._unverified(task, f"the winner's saved model could not be verified ({attempt} attempts): {why}")

    def _unverified(self, task: Task, why: str) -> None:
        task.candidate = None
        self._write_task(task, candidate=None)
        self.finish(task, TaskState.DONE, winner=task.winner, met_goal=task.met_goal, error=why)

    def _hand_out(self, task: Task, sha: str) -> None:
        """The artifact is the task's: its tenant may download it from now on."""
        self.add_owner(sha, task.owner)
        task.artifact, task.candidate = make_ref(sha, "model"), None
        self._write_task(task, artifact=task.artifact, candidate=None)
        self.finish(task, TaskState.DONE, winner=task.winner, met_goal=task.met_goal, error=task.error)
