"""Hostile answers to the jobs of lazy exactness (issue 18): early-stop intervals that do not hold together,
refines that disagree with their trial, baseline and refine results from peers that hold no lease."""

from __future__ import annotations


import zmq
import zmq.asyncio

from nsd.protocol import Cmd, JobRef, pack
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, done, plan_answer, spec


class Stranger:
    """A raw DEALER that never registered: what it sends as a worker must count for nothing."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send(self, cmd: Cmd, body: dict) -> None:
        await self.sock.send_multipart(pack(cmd, body))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


async def test_stop_intervals_and_refines_that_do_not_hold_together_count_for_nothing(broker, client):
    """A lease holder's early-stop and refine answers are checked: an interval upside down, a bound that would
    meet the goal, a refine metric outside the trial's interval — each is an error for that trial (never a
    metric the answer rests on). Forged baseline and refine results from a stranger are ignored. The task
    ends with the answer the honest trials give."""
    answers = {0: {"stopped_early": True, "bound": 0.5, "low": 0.9, "high": 0.5},  # low > high
               1: {"stopped_early": True, "bound": 0.95, "low": 0.1, "high": 0.95},  # 0.95 meets the goal (0.9)
               2: {"stopped_early": True, "bound": 0.7, "low": 0.4, "high": 0.7},  # may beat trial 3: refined
               3: {"metric": 0.6}}

    def answer(job):
        if job["kind"] == "plan":
            return {"ok": True, "configs": plan_answer(1.0, 4)["configs"]}
        if job["kind"] == "baseline":
            return {"ok": True, "baseline": 1.0}
        if job["kind"] == "refine":
            return {"ok": True, "metric": 0.8}  # outside [0.4, 0.7]: this full run disagrees with the first
        return {"ok": True, **({"metric": None} if "metric" not in answers[job["index"]] else {}),
                **answers[job["index"]]}

    stranger = Stranger(broker.endpoints["workers"])
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=1, answer=answer).start()
    try:
        task_id = await client.submit(spec())
        ignored = broker.core.ignored_results
        for job, body in ((JobRef("baseline"), {"baseline": 0.0}), (JobRef("refine", 2), {"metric": 0.99})):
            await stranger.send(Cmd.RESULT, {"trial_id": job.id(task_id), "attempt": 1, "ok": True, **body})
        await wait_for(lambda: broker.core.ignored_results >= ignored + 2, 10)
        task = await done(client, task_id)
        trials = task["trials"]
        assert [t["state"] for t in trials[:4]] == ["error", "error", "failed_goal", "failed_goal"]
        assert trials[2]["refine"] == "failed" and "outside its early-stop interval" in trials[2]["error"]
        assert task["baseline"] == 1.0 and task["winner"]["index"] == 3 and task["winner"]["metric"] == 0.6
    finally:
        await w.stop()
        stranger.close()
