"""A drain hand-back is not a failure: a job its worker gives back on purpose (grace over) runs again
elsewhere under the same attempt, even with max_attempts = 1."""

from __future__ import annotations


import pytest

from nsd.protocol import Cmd
from tests.conftest import UNDISTURBED_WINNER, slow_spec, wait_for
from tests.peers import ScriptedWorker, plan_then_hold, spec


async def test_a_trial_handed_back_with_bye_is_requeued_without_using_an_attempt(broker, client):
    leaver = await ScriptedWorker(broker.endpoints["workers"], "leaver", answer=plan_then_hold(2)).start()
    task_id = await client.submit(spec(max_attempts=1))
    await wait_for(lambda: len(leaver.assigned) == 2, 10)  # the plan, then trial 0
    (trial, attempt, _), = [a for a in leaver.assigned if a[0].endswith("/0")]
    leaver.send(Cmd.BYE, {"handback": True})
    heir = await ScriptedWorker(broker.endpoints["workers"], "heir", answer=plan_then_hold(2)).start()
    await wait_for(lambda: any(a[0] == trial for a in heir.assigned), 10)
    assert [a[1] for a in heir.assigned if a[0] == trial] == [attempt] == [1]  # same attempt, not used up
    heir.result((trial, attempt), {"ok": True, "metric": 1.0})
    await wait_for(lambda: (trial, attempt) in heir.acked, 10)  # the RESULT went on another socket
    task = await client.status(task_id)
    assert task["trials"][0]["state"] == "passed" and task["trials"][0]["worker"] == "heir"
    await leaver.stop()
    await heir.stop()


async def test_a_bye_without_handback_still_uses_up_the_attempt(broker, client):
    """An older worker's plain BYE keeps today's meaning: with max_attempts = 1 the trial ends in error."""
    leaver = await ScriptedWorker(broker.endpoints["workers"], "leaver", answer=plan_then_hold(2)).start()
    task_id = await client.submit(spec(max_attempts=1))
    await wait_for(lambda: len(leaver.assigned) == 2, 10)
    leaver.send(Cmd.BYE, {})

    async def errored():
        return (await client.status(task_id))["trials"][0]["state"] == "error"

    await wait_for(errored, 10)
    await leaver.stop()


async def test_a_lease_a_draining_worker_no_longer_lists_is_handed_back(broker, client):
    """Draining, a worker registers again with no slots and only what it runs: an assignment still
    waiting in its backlog was given back unstarted, and uses up no attempt either."""
    leaver = await ScriptedWorker(broker.endpoints["workers"], "leaver", slots=2, answer=plan_then_hold(2)).start()
    task_id = await client.submit(spec(max_attempts=1))
    await wait_for(lambda: len(leaver.assigned) == 3, 10)  # the plan, then trials 0 and 1
    leaver.send(Cmd.READY, {"worker_id": "leaver", "boot_id": "b1", "host": "scripted", "cores": 2, "slots": 0,
                            "version": 1, "running": [[f"{task_id}/0", 1]], "outbox": [], "draining": True})

    async def requeued():
        trials = (await client.status(task_id))["trials"]
        return trials[1]["state"] == "pending" and trials[0]["state"] == "running"

    await wait_for(requeued, 10)
    assert [(t["attempt"], t["state"]) for t in (await client.status(task_id))["trials"]] == \
        [(1, "running"), (1, "pending")]
    await leaver.stop()


@pytest.mark.slow
async def test_drain_hands_back_a_trial_that_then_completes_elsewhere(broker, client, start_workers, monkeypatch):
    """Real worker daemons: the drained worker's trial (max_attempts = 1) ends with a metric, not an error."""
    monkeypatch.setenv("NSD_TEST_SLOW_S", "1.5")
    (steady,) = await start_workers(1)  # its runner starts now, with this environment
    task = slow_spec(1.5)
    task["tuning"]["max_attempts"] = 1
    task_id = await client.submit(task)

    async def tuning():
        return (await client.status(task_id))["state"] == "tuning"

    await wait_for(tuning, 120, 0.1)
    monkeypatch.setenv("NSD_TEST_SLOW_S", "600")  # the second worker's trials outlast any grace
    (drained,) = await start_workers(1)

    async def drained_runs_a_trial():
        status = await client.status(task_id)
        return [t for t in status["trials"] if t["state"] == "running" and t["worker"] == drained.worker_id]

    (victim,) = (await wait_for(drained_runs_a_trial, 60, 0.1))[:1]
    drained.stop(grace_s=1.0)  # the drain API: what SIGTERM calls
    result = await client.result(task_id, wait=True)
    assert result["state"] == "done"
    assert (result["winner"]["index"], result["winner"]["metric"]) == UNDISTURBED_WINNER
    moved = result["trials"][victim["index"]]
    if moved["state"] == "cancelled":  # moot: only a trial above the winner is cancelled, wherever it was
        assert victim["index"] > result["winner"]["index"], moved
    else:  # handed back, then run to its end on the steady worker under the same attempt
        assert moved["state"] in ("passed", "failed_goal"), moved
        assert (moved["worker"], moved["attempt"]) == (steady.worker_id, 1)
    assert not any(t["state"] == "error" for t in result["trials"]), [t["error"] for t in result["trials"]]
