"""The worker's jobs: accepted by credit (or held in its backlog), their files fetched, run on a slot's
runner, their results kept in the outbox and sent; cancelled; a running trial's early-stop rule passed on
(`RULE`). A mixin of `nsd.worker.daemon.WorkerDaemon` (it uses the daemon's pool, transfers, blobs, outbox
and socket), split out so that each file reads in one sitting.
"""

from __future__ import annotations

import logging
from functools import partial

from nsd.protocol import Cmd
from nsd.worker import checks
from nsd.worker.jobs import erase_task_files, run_job
from nsd.worker.sandbox import shared_task_paths
from nsd.worker.slots import Slot

log = logging.getLogger("nsd.worker")
# A cancelled job may end on its own this long before its runner is killed. Killing costs a fresh runner
# (torch and INC imported again: seconds), which the next job on that slot waits for — often the same
# task's save or verify, right after the trials above the winner were cancelled.
CANCEL_GRACE_S = 2.0


class JobFlow:
    def _accept(self, trial_id: str, attempt: int, job: dict) -> None:
        if not self.taking_jobs:
            return  # crossed our drain notice: the lease goes back to the broker with our BYE
        if self.pool.holding(trial_id, attempt) or any((t, a) == (trial_id, attempt) for t, a, _ in self.backlog):
            return  # a duplicate ASSIGN: we already run it
        slot = self.pool.slot_for(job)
        if slot is None:
            self.backlog.append((trial_id, attempt, job))
            return
        self.pool.occupy(slot, trial_id, attempt, job["task_id"], self._execute(slot, trial_id, attempt, job))

    async def _execute(self, slot: Slot, trial_id: str, attempt: int, job: dict) -> None:
        pins: list[str] = []
        try:
            try:
                if job["kind"] == "plan":  # it needs no files: it runs now, and they are fetched meanwhile
                    self.pool.in_background(partial(self._prefetch, slot, job))
                else:
                    job = await self.transfers.materialize(job, pins)
            except Exception as exc:  # not the job's fault: the broker runs it again (attempt + 1)
                log.warning("could not fetch the files of %s: %s", trial_id, exc)
                answer = {"ok": False, "requeue": True, "error": f"worker could not fetch the task's files: {exc}"}
            else:
                why = checks.shared_paths(shared_task_paths(job["spec"]), self.shared_dirs)
                answer = {"ok": False, "error": why} if why else await run_job(
                    slot.runner, trial_id, attempt, job, self.cache_dir, self.transfers.upload)
            result = checks.result({**answer, "trial_id": trial_id, "attempt": attempt, "worker_id": self.worker_id})
            if (trial_id, attempt) in self.cancelled:
                log.info("cancelled %s (attempt %d) ended on its own: its runner stays", trial_id, attempt)
            elif job["task_id"] in self.erased:  # deleted while it ran: its answer and files go too
                erase_task_files(self.cache_dir, job["task_id"])
            else:
                self.outbox.keep(result)
                self._send(Cmd.RESULT, result)
        finally:
            self.cancelled.discard((trial_id, attempt))
            slot.job, slot.task = None, None
            self._warm_up(slot)
            for sha in pins:
                self.blobs.unpin(sha)
            self.blobs.evict()
            if self.backlog and not self._leaving.is_set():
                waiting, self.backlog = self.backlog, []
                for item in waiting:  # in order; what still does not fit waits again; draining, all are dropped
                    self._accept(*item)

    async def _prefetch(self, planning: Slot, job: dict) -> None:
        """A plan's task files, fetched while the plan runs (it expands the config set, no model): its baseline
        and trials find them here, and the idle runners load its model meanwhile."""
        pins: list[str] = []
        try:
            job = await self.transfers.materialize(job, pins)
            if checks.shared_paths(shared_task_paths(job["spec"]), self.shared_dirs) is None:
                self.pool.warm_others(planning, job)
        finally:
            for sha in pins:
                self.blobs.unpin(sha)

    def _new_rule(self, trial_id: str, attempt: int, rule: dict) -> None:
        """A trial we run, or have waiting, learns its early-stop rule (the broker now knows the goal)."""
        for t, a, job in self.backlog:
            if (t, a) == (trial_id, attempt):
                job["rule"] = rule
                return
        slot = self.pool.holding(trial_id, attempt)
        if slot is not None:
            slot.runner.update({"id": trial_id, "rule": rule})

    def _warm_up(self, slot: Slot) -> None:
        """A runner that died (crash, timeout, cancel) is replaced now, unless we are on our way out."""
        if self.taking_jobs:
            self.pool.restart(slot)

    def _cancel(self, trial_id: str, attempt: int) -> None:
        self.backlog = [b for b in self.backlog if (b[0], b[1]) != (trial_id, attempt)]
        slot = self.pool.holding(trial_id, attempt)
        if slot is not None and (trial_id, attempt) not in self.cancelled:
            self.cancelled.add((trial_id, attempt))
            self.pool.in_background(partial(self._end_cancelled, slot, trial_id, attempt))

    async def _end_cancelled(self, slot: Slot, trial_id: str, attempt: int) -> None:
        """Wait CANCEL_GRACE_S for the job to end on its own, then kill its runner. Jobs the broker assigns
        meanwhile wait in the backlog for the slot."""
        if slot.task is not None and not await self.pool.ends_within(slot.task, CANCEL_GRACE_S) \
                and slot.job == (trial_id, attempt):
            await self.pool.kill_job(slot)
            self._warm_up(slot)
            log.info("cancelled %s (attempt %d): its runner was killed", trial_id, attempt)
