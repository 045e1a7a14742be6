"""The broker with deployment figures, over real loopback sockets and scripted worker peers (no INC, no torch):
objectives pick among passing trials by their figures, "first" stays INC's, a trial whose figures lose is not
evaluated (and only if they really lose), figures are cached per kind of machine, tasks can be pinned to a
worker label, and the figures reach the task view, its events and the result."""

from __future__ import annotations

import asyncio
import itertools

from nsd.client.readme import loading_readme
from nsd.client.view import apply_event, progress_line, result_text
from nsd.protocol import Cmd
from tests.peers import FP32_FIGURES as FP32
from tests.peers import HW, VERSIONS, ScriptedWorker, done, figures, figures_answers as answers, plan_answer, spec

TABLE = {0: (0.95, 50.0), 1: (0.5, 5.0), 2: (0.99, 20.0), 3: (0.97, 20.5)}


RUNS = itertools.count()


async def run(client, broker, table, slots=4, **tuning) -> tuple[dict, ScriptedWorker]:
    w = await ScriptedWorker(broker.endpoints["workers"], f"run{next(RUNS)}", slots=slots, answer=answers(table), hardware=HW,
                             versions=VERSIONS).start()
    try:
        task = await done(client, await client.submit(spec(config_set=[{"rtn": {"bits": [0, 1, 2, 3]}}],
                                                           **tuning)))
    finally:
        await leave(w)
    return task, w


async def leave(w: ScriptedWorker) -> None:
    """Say BYE first: the next task must not be placed on a worker that only looks alive."""
    w.send(Cmd.BYE, {})
    await asyncio.sleep(0.05)
    await w.stop()


async def test_latency_picks_the_fastest_passing_trial_and_first_stays_incs(broker, client):
    task, w = await run(client, broker, TABLE, objective="latency")
    assert task["state"] == "done" and task["met_goal"] is True
    assert task["winner"]["index"] == 2  # 3 is within 5% of 2: a tie, the earliest wins
    assert [t["state"] for t in task["trials"]] == ["passed", "failed_goal", "passed", "passed"]  # none cancelled
    assert all(a[2].get("keep") for a in w.assigned if a[2]["kind"] == "trial")  # any pass may win
    deploy = task["winner"]["deploy"]
    assert deploy["latency_ms"] == 20.0 and deploy["speedup"] == 5.0 and deploy["size_ratio"] == 0.25
    assert task["winner"]["measured_on"] == HW and task["baseline_figures"] == FP32
    assert task["baseline_deploy"]["latency_ms"] == 100.0 and task["objective"] == "latency"
    assert task["pareto"] == [2]  # 0 and 3 are slower at a lower metric than 2
    assert task["trials"][1]["figures"] is None  # a failing trial is not measured (tuning.measure = passing)
    text = result_text(task)  # nsd result
    assert "deployed  20 ms per batch p50 (p90 22 ms), 5.00x FP32, 1.0 KB (0.25x FP32)" in text
    assert "fp32      100 ms per batch p50 (scripted), 4.0 KB" in text and 'objective "latency"' in text
    assert "20 ms 5.00x 1.0 KB *" in text  # trial 2's line, in the Pareto set
    assert "fastest passing 20 ms 5.00x 1.0 KB" in progress_line(task)  # nsd watch
    readme = loading_readme(task, "model")  # nsd fetch's README
    assert "Speed-up against the best FP32 form: **5.00x**" in readme and "Scripted CPU" in readme
    assert "model = torch.compile(model)" not in readme  # an rtn winner: weight-only, loaded eagerly

    first, _ = await run(client, broker, TABLE)
    assert first["winner"]["index"] == 0 and first["objective"] == "first"  # INC's answer
    assert first["winner"]["deploy"]["speedup"] == 2.0  # the winner still carries its figures


async def test_a_margin_makes_the_earliest_of_near_equal_trials_win(broker, client):
    table = {0: (0.95, 21.0), 1: (0.5, 5.0), 2: (0.99, 20.0), 3: (0.97, 30.0)}
    task, _ = await run(client, broker, table, objective="latency", objective_margin=0.1)
    assert task["winner"]["index"] == 0  # 21 <= 20 x 1.1
    task, _ = await run(client, broker, table, objective="latency", objective_margin=0.0)
    assert task["winner"]["index"] == 2


async def test_a_trial_whose_figures_lose_is_not_evaluated_and_a_false_claim_is_an_error(broker, client):
    table = {0: (0.95, 10.0), 1: (0.99, 30.0), 2: (0.99, 10.2), 3: (0.5, 1.0)}
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=1, hardware=HW, versions=VERSIONS,
                             answer=answers(table, pruned={1: 30.0, 2: 10.2})).start()
    try:
        task = await done(client, await client.submit(spec(config_set=[{"rtn": {"bits": [0, 1, 2, 3]}}],
                                                           objective="latency")))
    finally:
        await w.stop()
    jobs = [a[2] for a in w.assigned if a[2]["kind"] == "trial"]
    assert "prune" not in jobs[0] and jobs[1]["prune"]["best"] == 10.0 and jobs[1]["prune"]["margin"] == 0.05
    t = task["trials"]
    assert t[1]["state"] == "cancelled" and t[1]["pruned"] is True and t[1]["metric"] is None
    assert t[1]["figures"]["forms"][0]["p50_ms"] == 30.0 and "not evaluated" in t[1]["error"]
    # 10.2 ties 10.0 within the margin: "pruned" is not believed, the trial is an error, not a silent skip
    assert t[2]["state"] == "error" and t[2]["pruned"] is False
    assert task["winner"]["index"] == 0


async def test_figures_are_reused_only_on_the_same_kind_of_machine(broker, client):
    task, _ = await run(client, broker, TABLE, objective="latency")
    again, w = await run(client, broker, TABLE, objective={"latency": 0.5, "size": 0.5})
    assert again["winner"]["index"] == 2 and all(t["cached"] for t in again["trials"])
    assert [a[2]["kind"] for a in w.assigned] == []  # plan, trials and save: all answered from the cache
    assert again["trials"][2]["figures"] == task["trials"][2]["figures"]

    other = {**HW, "cpu": "Another CPU"}
    w = await ScriptedWorker(broker.endpoints["workers"], "s2", slots=4, answer=answers(TABLE), hardware=other,
                             versions=VERSIONS).start()
    try:
        third = await done(client, await client.submit(spec(config_set=[{"rtn": {"bits": [0, 1, 2, 3]}}],
                                                            objective="latency", objective_margin=0.2)))
    finally:
        await w.stop()
    kinds = [a[2]["kind"] for a in w.assigned]
    assert "plan" in kinds and kinds.count("trial") >= 3  # FP32 and the passing trials measured again there
    assert third["trials"][2]["measured_on"]["cpu"] == "Another CPU" and third["baseline_on"]["cpu"] == "Another CPU"


async def test_a_task_pinned_to_a_label_waits_for_such_a_worker(broker, client):
    plain = await ScriptedWorker(broker.endpoints["workers"], "plain", slots=2, answer=answers(TABLE),
                                 hardware=HW).start()
    try:
        task_id = await client.submit({**spec(config_set=[{"rtn": {"bits": [0, 1, 2, 3]}}]),
                                       "resources": {"hardware": "spr"}})
        await asyncio.sleep(0.5)
        assert plain.assigned == [] and (await client.status(task_id))["state"] == "queued"
        spr = await ScriptedWorker(broker.endpoints["workers"], "spr1", slots=2, answer=answers(TABLE),
                                   hardware={**HW, "label": "spr"}).start()
        try:
            task = await done(client, task_id)
            assert task["state"] == "done" and plain.assigned == [] and spr.assigned
            assert task["trials"][0]["measured_on"]["label"] == "spr"
            cluster = await client.cluster()
            assert {w["worker_id"]: (w["hardware"] or {}).get("label") for w in cluster} == {"plain": None,
                                                                                           "spr1": "spr"}
        finally:
            await spr.stop()
    finally:
        await plain.stop()


async def test_events_fold_into_the_same_figures_as_the_result(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2, answer=answers(TABLE), hardware=HW,
                             delay_s=0.01).start()
    try:
        task_id = await client.submit(spec(config_set=[{"rtn": {"bits": [0, 1, 2, 3]}}], objective="latency"))
        view = None
        async for event in client.events(task_id):
            view = apply_event(view, event)
        final = await client.result(task_id)
        for key in ("winner", "baseline_figures", "baseline_on", "baseline_deploy", "pareto"):
            assert view[key] == final[key], key
        assert [t["deploy"] for t in view["trials"]] == [t["deploy"] for t in final["trials"]]
    finally:
        await w.stop()


async def test_a_worker_cannot_skip_a_trial_nor_give_figures_nobody_asked_for(broker, client):
    def answer(job: dict) -> dict:
        if job["kind"] == "plan":
            return {**plan_answer(1.0, 2), "figures": figures(1.0)}
        if job["index"] == 0:  # no prune rule was given: "pruned" is a claim to skip work
            return {"ok": True, "metric": None, "pruned": True, "figures": figures(1.0)}
        return {"ok": True, "metric": 0.95, "figures": figures(1.0)}

    w = await ScriptedWorker(broker.endpoints["workers"], "hostile", slots=2, answer=answer, hardware=HW).start()
    try:
        task = await done(client, await client.submit(spec(config_set=[{"rtn": {"bits": [0, 1]}}], measure="none")))
    finally:
        await leave(w)
    assert task["trials"][0]["state"] == "error" and task["trials"][0]["pruned"] is False
    assert task["baseline_figures"] is None  # measure = "none": the plan's figures are not taken
    assert task["winner"]["index"] == 1 and task["winner"]["figures"] is None
