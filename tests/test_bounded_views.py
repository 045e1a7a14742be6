"""Bounded views (issue 15 item 7): STATUS and RESULT_GET page a task's trials, so that a task of any size
stays readable through the client; the client reads every page by default, or the one asked for."""

from __future__ import annotations

import pytest

from nsd.broker import client_requests
from nsd.protocol import MAX_MESSAGE_BYTES, Cmd, pack
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, count_assigned, plan_then_hold, spec


async def test_trials_come_in_pages_and_the_client_reads_them_all(broker, client, monkeypatch):
    monkeypatch.setattr(client_requests, "DEFAULT_PAGE", 64)  # the broker's page when none is asked for
    worker = await ScriptedWorker(broker.endpoints["workers"], "w", answer=plan_then_hold(300)).start()
    try:
        task_id = await client.submit(spec(max_trials=1000))
        await wait_for(lambda: count_assigned(worker, "trial", 1), 10)
        page = await client.status(task_id, offset=100, limit=50)
        assert [t["index"] for t in page["trials"]] == list(range(100, 150))
        assert page["trials_page"] == {"offset": 100, "limit": 50, "total": 300}
        raw = (await client.request(Cmd.RESULT_GET, task_id=task_id))["task"]
        assert len(raw["trials"]) == 64 and raw["trials_page"]["total"] == 300
        for read in (client.status, client.result):
            whole = await read(task_id)
            assert [t["index"] for t in whole["trials"]] == list(range(300))
            assert "trials_page" not in whole  # the whole view
        assert (await client.status(task_id, offset=299))["trials"][0]["index"] == 299
        assert (await client.status(task_id, offset=5000))["trials"] == []
    finally:
        await worker.stop()


def product_plan(bits: int, sizes: int) -> dict:
    """A plan of bits x sizes configs, in the order of the config set below."""
    return {"ok": True, "baseline": 1.0, "configs": [{"config": {"rtn": {"bits": b, "group_size": g}}, "label": ""}
                                                      for b in range(bits) for g in range(sizes)]}


@pytest.mark.slow
async def test_a_task_of_100000_trials_stays_readable(broker, client):
    """The attack of issue 15 item 7: a 100,000-config plan made every STATUS and RESULT reply exceed 16 MiB,
    so the task could never be read again. Each page is now far below that, and the whole view is read."""
    plan = product_plan(1000, 100)
    worker = await ScriptedWorker(broker.endpoints["workers"], "w",
                                  answer=lambda job: plan if job["kind"] == "plan" else None).start()
    try:
        big = {**spec(max_trials=100_000), "name": "big"}
        big["tuning"]["config_set"] = [{"rtn": {"bits": list(range(1000)), "group_size": list(range(100))}}]
        task_id = await client.submit(big)
        await wait_for(lambda: count_assigned(worker, "trial", 1), 120)
        reply = await client.request(Cmd.STATUS, task_id=task_id)
        assert len(pack(Cmd.REPLY, reply)[-1]) < MAX_MESSAGE_BYTES // 4
        task = await client.result(task_id)
        assert len(task["trials"]) == 100_000 and task["trials"][-1]["config"] == {"rtn": {"bits": 999, "group_size": 99}}
    finally:
        await worker.stop()
