"""The fallback search in the broker, over real sockets with scripted workers (no INC): the broker's answer
equals search.sequential's on the same metric table; stages, fallbacks and winners reach jobs, events,
SQLite and a restarted broker."""

from __future__ import annotations

import os
import sqlite3

import pytest

from nsd.broker import search, tuner
from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.broker.store import Store
from nsd.client.api import AsyncClient
from nsd.client.view import apply_event, result_text
from tests.conftest import wait_for
from tests.peers import ScriptedWorker

OPS = ["layer.0.q", "layer.0.out", "layer.1.q", "layer.1.out", "head"]
BLOCKS = [["layer.0.q", "layer.0.out"], ["layer.1.q", "layer.1.out"]]


def spec(**tuning) -> dict:
    return {"name": "fallback", "recipe": {"kind": "python", "file": os.path.abspath(__file__)},
            "tuning": {"config_set": [{"rtn": {"bits": [2, 3]}}], "tolerable_loss": 0.0, **tuning}}


def table(fallback: tuple[str, ...], base: int) -> float:
    """Metrics that reward keeping `head` and `layer.1.q` in FP32 (base 1 is the better config)."""
    score = 0.5 + 0.1 * base + 0.2 * ("head" in fallback) + 0.15 * ("layer.1.q" in fallback) \
        + 0.01 * ("layer.0.q" in fallback)
    return round(score, 6)


def answer_from(tab, blocks=BLOCKS):
    def answer(job: dict) -> dict:
        if job["kind"] == "plan":
            return {"ok": True, "baseline": 1.0, "ops": {"rtn": {"ops": OPS, "blocks": blocks}},
                    "configs": [{"config": {"rtn": {"bits": b}}, "label": f"rtn(bits={b})"} for b in (2, 3)]}
        base = 0 if job["config"] == {"rtn": {"bits": 2}} else 1
        return {"ok": True, "metric": tab(tuple(job.get("fallback") or ()), base)}
    return answer


def reference(tab, baseline: float, tolerable_loss: float, max_trials: int = 100, blocks=BLOCKS):
    layout = search.Layout(("rtn", "rtn"), {"rtn": search.OpList(tuple(OPS), tuple(map(tuple, blocks)))}, max_trials)
    goal = tuner.Goal(baseline, tolerable_loss)
    return search.sequential(layout, lambda stage, base, fb: tab(fb, base), lambda m: tuner.meets_goal(m, goal))


async def done(client: AsyncClient, task_id: str, timeout: float = 20) -> dict:
    async def ended():
        task = await client.status(task_id)
        return task if task["state"] in ("done", "failed", "cancelled") else None
    return await wait_for(ended, timeout)


@pytest.mark.parametrize("tolerable_loss,max_trials,blocks,stage", [
    (0.25, 100, BLOCKS, "block-wise"),    # 0.75: the last block in FP32 (layer.1.q inside)
    (0.2, 100, [], "op-wise"),            # no blocks: `head` alone reaches 0.8
    (0.1, 100, [], "accumulated"),        # 0.9 needs head + layer.1.q
    (0.0, 100, BLOCKS, None),             # 1.0 is out of reach: the best over every stage
    (0.1, 6, [], None),                   # max_trials cuts the op-wise stage
])
async def test_broker_answer_equals_the_sequential_search(broker, client, tolerable_loss, max_trials, blocks, stage):
    run, ref_winner, ref_met = reference(table, 1.0, tolerable_loss, max_trials, blocks)
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=3, delay_s=0.01,
                             answer=answer_from(table, blocks)).start()
    try:
        task_id = await client.submit(spec(tolerable_loss=tolerable_loss, max_trials=max_trials))
        view = None
        async for event in client.events(task_id):
            view = apply_event(view, event)
        task = await client.result(task_id)
        assert task["state"] == "done" and task["met_goal"] is ref_met
        ref = run[ref_winner]
        winner = task["winner"]
        assert (winner["index"], winner["stage"], tuple(winner["fallback"]), winner["metric"]) == \
            (ref.index, ref.stage, ref.fallback, ref.metric)
        if stage is not None:
            assert winner["stage"] == stage and ref_met
        assert len(task["trials"]) <= max_trials
        for tr, ref_tr in zip(task["trials"], run):  # one global order
            assert (tr["stage"], tuple(tr["fallback"])) == (ref_tr.stage, ref_tr.fallback)
        # jobs: fallback trials carry best's config and their ops; the save job the winner's
        jobs = [j for _, _, j in w.assigned]
        for j in jobs:
            if j["kind"] == "trial":
                tr = task["trials"][j["index"]]
                assert j["fallback"] == tr["fallback"] and j["config"] == tr["config"]
        (save,) = [j for j in jobs if j["kind"] == "save"]
        assert save["fallback"] == winner["fallback"]
        # the live view folds to the same answer
        assert view["winner"] == winner
        assert [(t["stage"], t["fallback"], t["state"]) for t in view["trials"]] == \
            [(t["stage"], t["fallback"], t["state"]) for t in task["trials"]]
        text = result_text(task)
        if winner["fallback"]:
            assert f"+ {len(winner['fallback'])} ops in FP32" in winner["label"] or \
                f"+ {winner['fallback'][0]} in FP32" in winner["label"]
            assert "fp32 ops  " + ", ".join(winner["fallback"]) in text
    finally:
        await w.stop()


async def test_list_strategy_stops_after_the_config_set(broker, client):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=2, answer=answer_from(table)).start()
    try:
        task = await done(client, await client.submit(spec(tolerable_loss=0.1, strategy="list")))
        assert len(task["trials"]) == 2 and {t["stage"] for t in task["trials"]} == {"config"}
        assert task["winner"]["index"] == 1 and task["winner"]["fallback"] == [] and task["met_goal"] is False
    finally:
        await w.stop()


async def test_a_plan_with_malformed_op_lists_fails_the_task(broker, client):
    def answer(job):
        return {**answer_from(table)(job), "ops": {"rtn": {"ops": ["a"], "blocks": [["b", {"x": 1}]]}}}

    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=1, answer=answer).start()
    try:
        task = await done(client, await client.submit(spec()))
        assert task["state"] == "failed" and "malformed plan" in task["error"]
    finally:
        await w.stop()


async def test_a_restarted_broker_continues_the_search(tmp_path):
    """Stop the broker while the op-wise stage runs; the new one reloads stages and ops and adds the
    accumulated stage itself."""
    state = tmp_path / "state"
    held = []

    def hold_op_wise(job):
        if job["kind"] == "trial" and job["fallback"]:
            held.append(job["index"])
            return None
        return answer_from(table, [])(job)

    b = Broker(BrokerConfig(state_dir=state, clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*",
               heartbeat_s=0.2, liveness=3))
    await b.start()
    c = AsyncClient(b.endpoints["clients"])
    w = await ScriptedWorker(b.endpoints["workers"], "s1", slots=2, answer=hold_op_wise).start()
    task_id = await c.submit(spec(tolerable_loss=0.1))
    await wait_for(lambda: len(held) >= 2, 10)
    await w.stop()
    await c.close()
    await b.stop()
    b2 = Broker(BrokerConfig(state_dir=state, clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*",
                heartbeat_s=0.2, liveness=3))
    await b2.start()
    c2 = AsyncClient(b2.endpoints["clients"])
    w2 = await ScriptedWorker(b2.endpoints["workers"], "s2", slots=2, answer=answer_from(table, [])).start()
    try:
        task = await done(c2, task_id)
        run, ref_winner, _ = reference(table, 1.0, 0.1, blocks=[])
        assert task["winner"]["index"] == ref_winner and task["winner"]["stage"] == "accumulated"
        assert tuple(task["winner"]["fallback"]) == run[ref_winner].fallback
    finally:
        await w2.stop()
        await c2.close()
        await b2.stop()


OLD_SCHEMA = """
CREATE TABLE tasks (id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, baseline REAL, winner INTEGER, met_goal INTEGER,
    error TEXT, seq INTEGER NOT NULL DEFAULT 0, stage_attempt INTEGER NOT NULL DEFAULT 1, stage_worker TEXT,
    plan_s REAL, artifact TEXT);
CREATE TABLE trials (task_id TEXT NOT NULL REFERENCES tasks(id), idx INTEGER NOT NULL, config TEXT NOT NULL,
    label TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 1, metric REAL, worker TEXT,
    started REAL, finished REAL, seconds REAL, error TEXT, PRIMARY KEY (task_id, idx));
"""


async def test_a_database_from_before_the_search_opens_and_its_tasks_load(tmp_path):
    import json

    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "nsd.sqlite3")
    db.executescript(OLD_SCHEMA)
    old_spec = {"name": "old", "tuning": {"tolerable_loss": 0.01, "criterion": "relative", "higher_is_better": True,
                                          "max_trials": 5, "timeout_s": 0, "max_attempts": 3}, "resources": {}}
    db.execute("INSERT INTO tasks (id, name, spec, state, created, baseline, winner, met_goal) VALUES "
               "('t1', 'old', ?, 'done', 1.0, 1.0, 0, 1)", (json.dumps(old_spec),))
    db.execute("INSERT INTO trials (task_id, idx, config, label, state, metric) VALUES "
               "('t1', 0, '{\"rtn\": {}}', 'rtn()', 'passed', 0.99)")
    db.commit()
    db.close()
    Store(state / "nsd.sqlite3").close()  # migrates
    Store(state / "nsd.sqlite3").close()  # and a second open finds nothing to do
    b = Broker(BrokerConfig(state_dir=state, clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*"))
    await b.start()
    c = AsyncClient(b.endpoints["clients"])
    try:
        task = await c.result("t1")
        assert task["trials"][0]["stage"] == "config" and task["trials"][0]["fallback"] == []
        assert task["winner"]["fallback"] == [] and task["winner"]["metric"] == 0.99
    finally:
        await c.close()
        await b.stop()
