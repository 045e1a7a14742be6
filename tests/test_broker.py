"""The broker over real loopback sockets, with scripted worker peers (no INC: fast)."""

from __future__ import annotations


import pytest

from nsd.blobs import parse_ref
from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient, BrokerError
from nsd.client.view import apply_event
from nsd.protocol import Cmd, JobRef
from tests.conftest import wait_for
from tests.peers import SPEC, ScriptedWorker, count_assigned, done, metrics_answer, plan_answer, plan_then_hold, spec

async def test_lowest_passing_trial_wins_and_later_ones_are_cancelled(broker, client):
    # Trial 1 passes slowly-but-first in index order; 3 passes too; 0 and 2 fail.
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=3,
                             answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    try:
        task_id = await client.submit(spec())
        task = await done(client, task_id)
        assert task["state"] == "done" and task["met_goal"] is True
        assert task["winner"]["index"] == 1 and task["baseline"] == 1.0
        states = [t["state"] for t in task["trials"]]
        assert states[:2] == ["failed_goal", "passed"]
        assert all(s in ("cancelled", "failed_goal", "passed") for s in states[2:])
        assert w.max_running <= 3  # credits: never more jobs than slots
        sha, name = parse_ref(task["artifact"])  # the winner was saved by a worker and stored as a blob
        assert broker.blobs.path(sha).read_bytes() == b"artifact of trial 1"
        assert [a[2]["kind"] for a in w.assigned][0] == "plan"
        indexes = [a[2]["index"] for a in w.assigned if a[2]["kind"] == "trial"]
        assert indexes == sorted(indexes)  # dispatched in INC's order
    finally:
        await w.stop()


async def test_best_metric_wins_when_none_passes(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2,
                             answer=metrics_answer({0: 0.1, 1: 0.7, 2: "boom", 3: 0.7, 4: 0.3, 5: 0.2})).start()
    try:
        task = await done(client, await client.submit(spec()))
        assert task["state"] == "done" and task["met_goal"] is False
        assert task["winner"]["index"] == 1  # earliest of the tied best
        assert task["trials"][2]["state"] == "error" and task["trials"][2]["error"] == "boom"
    finally:
        await w.stop()


async def test_lower_is_better_and_absolute_goal(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=1,
                             answer=metrics_answer({0: 12.0, 1: 10.4, 2: 10.0}, baseline=10.0, n=3)).start()
    try:
        task = await done(client, await client.submit(spec(higher_is_better=False, criterion="absolute",
                                                           tolerable_loss=0.5)))
        assert task["winner"]["index"] == 1 and task["met_goal"] is True
    finally:
        await w.stop()


async def test_errors_do_not_stop_the_task_and_all_errors_fail_it(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2,
                             answer=metrics_answer({i: "ValueError: no" for i in range(6)})).start()
    try:
        task = await done(client, await client.submit(spec()))
        assert task["state"] == "failed" and "every trial errored" in task["error"]
        assert all(t["state"] == "error" for t in task["trials"])
    finally:
        await w.stop()


async def test_plan_failure_fails_the_task_with_its_message(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1",
                             answer=lambda job: {"ok": False, "error": "FileNotFoundError: model.pt"}).start()
    try:
        task = await done(client, await client.submit(spec()))
        assert task["state"] == "failed" and "FileNotFoundError: model.pt" in task["error"]
    finally:
        await w.stop()


async def test_workers_limit_caps_trials_at_once(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=4, delay_s=0.05,
                             answer=metrics_answer({i: 0.1 for i in range(6)})).start()
    try:
        s = spec()
        s["resources"] = {"workers": 2}
        task = await done(client, await client.submit(s))
        assert task["state"] == "done" and w.max_running == 2
    finally:
        await w.stop()


async def test_a_late_small_task_finishes_before_a_long_early_one(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2, delay_s=0.05,
                             answer=lambda job: plan_answer(1.0, 40 if job["spec"]["name"] == "big" else 2)
                             if job["kind"] == "plan" else {"ok": True, "metric": 0.1}).start()
    try:
        big = await client.submit({**spec(), "name": "big"})
        await wait_for(lambda: count_assigned(w, "trial", 2))
        small = await client.submit({**spec(), "name": "small"})
        small_done = await done(client, small)
        big_now = await client.status(big)
        assert small_done["state"] == "done" and big_now["state"] == "tuning"
        assert sum(t["state"] == "pending" for t in big_now["trials"]) > 20  # it went ahead, not behind
        big_done = await done(client, big)
        assert big_done["timings"]["finished"] > small_done["timings"]["finished"]
    finally:
        await w.stop()


async def test_cancel_mid_run_stops_running_trials(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2,
                             answer=plan_then_hold(6)).start()
    try:
        task_id = await client.submit(spec())
        await wait_for(lambda: count_assigned(w, "trial", 2))
        summary = await client.cancel(task_id)
        assert summary["state"] == "cancelled"
        task = await client.status(task_id)
        assert {t["state"] for t in task["trials"]} == {"cancelled"}
        await wait_for(lambda: len(w.cancelled) == 2)
        assert sorted(w.cancelled) == sorted((a[0], a[1]) for a in w.assigned if a[2]["kind"] == "trial")
        assert (await client.cluster())[0]["busy"] == 0
    finally:
        await w.stop()


async def test_dead_worker_trials_requeue_with_next_attempt(broker, client):
    answer = metrics_answer({i: 0.1 for i in range(6)})
    dying = await ScriptedWorker(broker.endpoints["workers"], "dying", slots=1,
                                 answer=lambda job: answer(job) if job["kind"] == "plan" else None).start()
    healthy = None
    try:
        task_id = await client.submit(spec(max_trials=2))
        await wait_for(lambda: count_assigned(dying, "trial", 1))
        dying.silent = True  # no heartbeats: declared dead after heartbeat_s * liveness
        healthy = await ScriptedWorker(broker.endpoints["workers"], "healthy", slots=1, answer=answer).start()
        task = await done(client, task_id)
        assert task["state"] == "done"
        assert task["trials"][0]["attempt"] == 2 and task["trials"][0]["worker"] == "healthy"
        assert task["trials"][1]["attempt"] == 1
    finally:
        await dying.stop()
        if healthy:
            await healthy.stop()


async def test_results_are_idempotent(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=1,
                             answer=plan_then_hold(2)).start()
    try:
        task_id = await client.submit(spec())
        await wait_for(lambda: count_assigned(w, "trial", 1))
        trial_id, attempt, _ = [a for a in w.assigned if a[2]["kind"] == "trial"][0]
        w.result((trial_id, attempt), {"ok": True, "metric": 0.2})
        w.result((trial_id, attempt), {"ok": True, "metric": 0.99})  # a duplicate must not change the outcome
        w.result((trial_id, attempt + 5), {"ok": True, "metric": 0.99})  # nor a stale attempt
        await wait_for(lambda: w.acked.count((trial_id, attempt)) == 2)
        task = await client.status(task_id)
        assert task["trials"][0]["metric"] == 0.2 and task["trials"][0]["state"] == "failed_goal"
    finally:
        await w.stop()


async def test_events_fold_into_the_final_result(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2, delay_s=0.01,
                             answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    try:
        task_id = await client.submit(spec())
        view, seqs = None, []
        async for event in client.events(task_id):
            view = apply_event(view, event)
            seqs.append(event["seq"])
        final = await client.result(task_id)
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        for key in ("state", "met_goal", "winner", "baseline", "seq"):
            assert view[key] == final[key], key
        assert [(t["state"], t["metric"]) for t in view["trials"]] == \
            [(t["state"], t["metric"]) for t in final["trials"]]
    finally:
        await w.stop()


async def test_invalid_spec_and_unknown_task_get_clear_errors(broker, client):
    with pytest.raises(BrokerError, match="tuning.tolerable_loss: must be at least"):
        await client.request(Cmd.SUBMIT, spec={**SPEC, "tuning": {**SPEC["tuning"], "tolerable_loss": -2}})
    with pytest.raises(BrokerError, match="no task 'nope'"):
        await client.status("nope")
    assert await client.list() == []


async def test_wrong_protocol_version_is_refused(broker):
    w = await ScriptedWorker(broker.endpoints["workers"], "old", version=99).start(wait=False)
    try:
        await wait_for(lambda: w.disconnects)
        assert w.disconnects[0]["fatal"] and "protocol version 99" in w.disconnects[0]["reason"]
    finally:
        await w.stop()


async def test_state_survives_a_broker_restart(tmp_path):
    state = tmp_path / "state"
    b = Broker(BrokerConfig(state_dir=state, clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*"))
    await b.start()
    c = AsyncClient(b.endpoints["clients"])
    w = await ScriptedWorker(b.endpoints["workers"], "s1", slots=2,
                             answer=metrics_answer({0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99})).start()
    task_id = await c.submit(spec())
    before = await done(c, task_id)
    await w.stop()
    await c.close()
    await b.stop()
    b2 = Broker(BrokerConfig(state_dir=state, clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*"))
    await b2.start()
    c2 = AsyncClient(b2.endpoints["clients"])
    try:
        after = await c2.result(task_id)
        assert after["trials"] == before["trials"] and after["winner"] == before["winner"]
        assert after["seq"] == before["seq"]
    finally:
        await c2.close()
        await b2.stop()


def test_the_brokers_running_tally_agrees_with_the_pure_decision_functions(tmp_path):
    """Task.set_state keeps counts so the broker never rescans trials; the objective's functions are the reference.
    Random histories driven through the broker's real core (results, lost leases, its own settle and
    schedule, a real SQLite store) must agree with them at every step, and what SQLite holds must equal
    what memory holds."""
    import random

    from nsd.broker.blobs import BlobStore
    from nsd.broker.core import Core
    from nsd.broker.metrics import Metrics
    from nsd.broker.model import Worker
    from nsd.broker.objective import First
    from nsd.broker.store import Store
    from nsd.spec import validate
    from nsd.states import TaskState, TrialState

    rng = random.Random(7)
    store = Store(tmp_path / "db.sqlite3")
    core = Core(store, Metrics(), 1.0, 5, BlobStore(tmp_path / "blobs"))
    worker = Worker(id="w", identity=b"w", boot_id="b", host="h", cores=4, slots=4, version="t", registered=0.0, last_seen=0.0)
    core.workers["w"] = worker
    core._index_free(worker)
    decided = 0
    try:
        for round_ in range(120):
            n = rng.randint(1, 10)
            body = {**spec(max_attempts=rng.randint(1, 3)), "resources": {"workers": rng.choice([0, 1, 2, 3])}}
            task_id = core.submit(validate(body, local_paths=True))
            with core.tx():
                core.schedule()  # the plan job
            task = core.tasks[task_id]
            core.result(worker, {"trial_id": f"{task_id}/plan", "attempt": task.lease(JobRef("plan"))[0], "ok": True,
                                 "baseline": 1.0, "configs": [{"config": {"rtn": {"bits": i}}} for i in range(n)]})
            for _ in range(60):
                if task.state is not TaskState.TUNING:
                    break
                views = task.views()
                objective = First(True)
                for limit in (0, 1, 2, 3):
                    assert task.dispatchable(limit) == len(objective.to_dispatch(views, limit))
                assert task.n_unfinished == sum(not v.state.finished for v in views)
                assert task.lowest_passed == objective.passed(views)
                assert objective.to_cancel(views) == []  # the core's settle cancelled them already
                assert task.best_index == objective.best(views)  # what early stop must beat (note_metric)
                running = [t for t in task.trials if t.state is TrialState.RUNNING]
                if rng.random() < 0.4 or not running:
                    with core.tx():
                        core.schedule()  # lowest pending first, within the task's `workers` limit
                    continue
                tr = rng.choice(running)
                with core.tx():
                    if rng.random() < 0.2:
                        core.lost_lease(task, JobRef("trial", tr.index), "test")
                    else:
                        core.result(worker, {"trial_id": f"{task_id}/{tr.index}", "attempt": tr.attempt,
                                             "ok": rng.random() < 0.9, "metric": rng.choice([0.5, 0.99, 1.0])})
            if task.state is TaskState.FINALIZING:  # it ended exactly when the objective says it is decided
                decision = First(True).decide(task.views())
                assert decision is not None and (task.winner, task.met_goal) == (decision.winner, decision.met_goal)
                decided += 1
            rows = {r["idx"]: (r["state"], r["attempt"], r["metric"]) for r in store.trials(task_id)}
            assert rows == {t.index: (t.state.value, t.attempt, t.metric) for t in task.trials}
            assert store.task(task_id)["state"] == task.state.value
            with core.tx():
                core.cancel(task)
        assert decided > 60  # most histories ran to a decision
    finally:
        store.close()


async def test_a_result_kept_in_the_outbox_counts_when_its_worker_registers_again(broker, client):
    """A worker that finished a trial while it could not reach the broker re-registers with that result in
    its outbox and the trial no longer in its running list: the result is taken, the trial is not redone."""
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=1,
                             answer=plan_then_hold(2)).start()
    try:
        task_id = await client.submit(spec())
        await wait_for(lambda: count_assigned(w, "trial", 1))
        trial_id_, attempt, _ = [a for a in w.assigned if a[2]["kind"] == "trial"][0]
        w.send(Cmd.READY, {"worker_id": "s1", "boot_id": "b2", "host": "scripted", "cores": 1, "slots": 1,
                           "version": 1, "running": [],
                           "outbox": [{"trial_id": trial_id_, "attempt": attempt, "ok": True, "metric": 0.3}]})
        await wait_for(lambda: (trial_id_, attempt) in w.acked)
        trial = (await client.status(task_id))["trials"][0]
        assert (trial["state"], trial["metric"], trial["attempt"]) == ("failed_goal", 0.3, 1)
    finally:
        await w.stop()
