"""A broker pair in this process (issue 20): two real brokers on loopback, scripted workers and real clients.
The copy, acknowledgement only after the passive broker wrote it, Binary Star's takeover rule, fencing by
epoch, a broker that returns, and the link's hostile input. Across hosts: tests/test_pair_netns.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import pytest

from nsd.client.api import AsyncClient, BrokerError, BrokerUnavailable, prepare_spec
from nsd.protocol import Cmd
from tests.conftest import wait_for
from tests.pairs import PairOfBrokers
from tests.peers import ScriptedWorker, count_assigned, done, metrics_answer, plan_then_hold, spec

METRICS = {0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99}


@pytest.fixture
async def pair(tmp_path):
    brokers = PairOfBrokers(tmp_path)
    yield brokers
    await brokers.close()


def rows(path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_the_primary_serves_and_the_backup_holds_a_row_for_row_copy(pair):
    await pair.start_both()
    client = AsyncClient(pair.both("clients"), timeout_s=5, idle_resnapshot_s=0.3)
    worker = await ScriptedWorker(pair.both("workers").split(",")[0], "w1", slots=2, delay_s=0.05,
                                  answer=metrics_answer(METRICS)).start()
    try:
        task_id = await client.submit(spec())
        assert (await done(client, task_id))["winner"]["index"] == 1
        await wait_for(lambda: _same(pair, "SELECT * FROM trials ORDER BY task_id, idx"), 10)
        assert await _same(pair, "SELECT * FROM tasks") and await _same(pair, "SELECT * FROM pair_terms")
        status = await client.request(Cmd.CLUSTER)
        assert status["pair"]["state"] == "active" and status["pair"]["peer"]["state"] == "passive"
    finally:
        await worker.stop()
        await client.close()


async def _same(pair, sql: str) -> bool:
    a = rows(pair.tmp / "primary" / "nsd.sqlite3", sql)
    return bool(a) and a == rows(pair.tmp / "backup" / "nsd.sqlite3", sql)


async def test_a_result_is_acknowledged_only_once_the_passive_broker_has_written_it(pair):
    _, backup = await pair.start_both()
    client = AsyncClient(pair.both("clients"), timeout_s=5)
    worker = await ScriptedWorker(pair.address("primary", "workers"), "w1", slots=1, answer=plan_then_hold(3)).start()
    try:
        task_id = await client.submit(spec())
        await wait_for(lambda: count_assigned(worker, "trial", 1), 10)
        reader = backup.pair._loop_task
        reader.cancel()  # the backup is alive (it still sends its state) but writes nothing more
        await asyncio.gather(reader, return_exceptions=True)
        job, attempt, _ = worker.assigned[-1]
        worker.result((job, attempt), {"ok": True, "metric": 0.1})
        await asyncio.sleep(1.0)  # ten of the primary's heartbeats: the acknowledgement must not come
        assert (job, attempt) not in worker.acked and worker.outbox
        backup.pair._loop_task = asyncio.create_task(backup.pair._read())
        await wait_for(lambda: _acked(worker, job), 10)
        index = int(job.split("/")[1])
        state = rows(pair.tmp / "backup" / "nsd.sqlite3", f"SELECT state FROM trials WHERE task_id = '{task_id}' "
                                                            f"AND idx = {index}")
        assert state == [("failed_goal",)]  # written on the backup before the primary acknowledged it
    finally:
        await worker.stop()
        await client.close()


async def _acked(worker, job: str) -> bool:
    return any(j == job for j, _ in worker.acked)


async def test_the_backup_takes_over_only_when_the_primary_is_silent_and_a_worker_lost_it(pair):
    _, backup = await pair.start_both()
    client = AsyncClient(pair.both("clients"), timeout_s=2)
    worker = await ScriptedWorker(pair.address("primary", "workers"), "w1", slots=2, answer=plan_then_hold(4)).start()
    try:
        task_id = await client.submit(spec())
        await wait_for(lambda: count_assigned(worker, "trial", 2), 10)
        (first, a1, _), (second, a2, _) = worker.assigned[1:3]
        worker.result((first, a1), {"ok": True, "metric": 0.1})
        await wait_for(lambda: _acked(worker, first), 10)
        before = (await client.status(task_id))["seq"]
        await pair.kill("primary")
        worker.result((second, a2), {"ok": True, "metric": 0.2})  # sent into the void: stays in its outbox
        window = pair.heartbeat_s * pair.liveness
        await asyncio.sleep(2 * window)  # the primary is silent well past the window, yet nobody came
        assert backup.pair.state.value == "passive"
        lone = AsyncClient(pair.address("backup", "clients"), timeout_s=2)  # a client with one endpoint: no witness
        with pytest.raises(BrokerError, match="passive"):
            await lone.status(task_id)
        await lone.close()
        assert backup.pair.state.value == "passive"
        await worker.move(pair.address("backup", "workers"))  # the worker lost the primary: the witness
        assert backup.pair.state.value in ("solo", "active") and worker.epoch == backup.pair.epoch >= 2
        await wait_for(lambda: _acked(worker, second), 10)  # its outbox delivered
        for job, attempt, _ in list(worker.assigned[3:]):
            worker.result((job, attempt), {"ok": True, "metric": 0.99})
        task = await done(client, task_id, 20)
        assert task["winner"]["index"] == 2 and task["seq"] > before
        assert [t["metric"] for t in task["trials"][:2]] == [0.1, 0.2]  # each counted once, as sent
        assert all(t["attempt"] == 1 for t in task["trials"][:3])
    finally:
        await worker.stop()
        await client.close()


@pytest.fixture
async def linked(tmp_path):
    brokers = PairOfBrokers(tmp_path, links=True)
    yield brokers
    await brokers.close()


async def test_only_the_link_between_the_brokers_cut_leaves_exactly_one_active(linked):
    pair = linked
    _, backup = await pair.start_both()
    client = AsyncClient(pair.both("clients"), timeout_s=5, idle_resnapshot_s=0.3)
    worker = await ScriptedWorker(pair.address("primary", "workers"), "w1", slots=1, delay_s=0.3,
                                  answer=metrics_answer(METRICS)).start()
    seen: list = []
    try:
        task_id = await client.submit(spec())
        pair.cut()
        watching = asyncio.create_task(pair.watch_active(4 * pair.window_s, seen))
        assert (await done(client, task_id, 30))["winner"]["index"] == 1  # served alone meanwhile
        await watching
        # Never two; never the backup; the primary held back for part of the window (cut off), then solo.
        assert set(seen) <= {("primary",), ()} and ("primary",) in seen[len(seen) // 2:], set(seen)
        await wait_for(lambda: _state(pair.brokers["primary"], "solo"), 10)
        assert backup.pair.state.value == "passive"
        pair.heal()
        await pair.settled("primary", 30)  # the backup caught up with what was done alone
        assert await _same(pair, "SELECT * FROM trials ORDER BY task_id, idx")
    finally:
        await worker.stop()
        await client.close()


async def test_a_cut_off_active_acknowledges_nothing_and_steps_down_on_a_newer_epoch(linked):
    pair = linked
    primary, backup = await pair.start_both()
    worker = await ScriptedWorker(pair.address("primary", "workers"), "w1", slots=1, answer=plan_then_hold(3)).start()
    client = AsyncClient(pair.both("clients"), timeout_s=2)
    seen: list = []
    try:
        task_id = await client.submit(spec())
        await wait_for(lambda: count_assigned(worker, "trial", 1), 10)
        pair.cut()  # the primary's host loses every link: its peer and its worker hear nothing more
        worker.silent = True
        watching = asyncio.create_task(pair.watch_active(6 * pair.window_s, seen))
        await wait_for(lambda: _silent_for(backup, pair.window_s), 10)
        worker.silent = False
        await worker.move(pair.address("backup", "workers"))  # it lost the primary: the backup takes over
        assert backup.pair.state.value == "solo" and worker.epoch == backup.pair.epoch == 2
        await wait_for(lambda: _state(primary, "cut-off"), 10)
        stranger = AsyncClient(pair.address("primary", "clients"), timeout_s=1)  # never met the backup: epoch 0
        with pytest.raises(BrokerUnavailable):
            await stranger.submit(spec())  # held, never acknowledged
        await stranger.close()
        await client.list()  # the primary holds every answer back: after its timeout the client asks the backup
        assert client.broker == pair.address("backup", "clients") and client.endpoints.epoch == 2
        client._drop_socket()
        client.endpoints.at = 0  # a client that has met the backup asks the old primary again, carrying epoch 2
        assert [t["task_id"] for t in await client.list()] == [task_id]  # asked the primary first, with epoch 2
        assert primary.pair.state.value == "pending" and client.broker == pair.address("backup", "clients")
        await watching
        assert all(len(s) <= 1 for s in seen) and ("backup",) in seen
        pair.heal()
        await pair.settled("backup", 30)  # the old primary starts over from the backup's state
        assert await _same(pair, "SELECT * FROM tasks") and len(rows(pair.tmp / "primary" / "nsd.sqlite3",
                                                                    "SELECT * FROM tasks")) == 1
    finally:
        await worker.stop()
        await client.close()


async def _silent_for(broker, seconds: float) -> bool:
    return broker.pair.silent_s(time.time()) >= seconds


async def _state(broker, state: str) -> bool:
    return broker.pair.state.value == state


async def test_a_returning_broker_comes_back_passive_catches_up_and_the_pair_fails_back(pair):
    _, backup = await pair.start_both()
    client = AsyncClient(pair.both("clients"), timeout_s=2, idle_resnapshot_s=0.3)
    worker = await ScriptedWorker(pair.address("primary", "workers"), "w1", slots=1, answer=plan_then_hold(6)).start()
    seqs: list[int] = []
    try:
        task_id = await client.submit(spec())

        async def follow():
            async for event in client.events(task_id):
                seqs.append(event["seq"])

        follower = asyncio.create_task(follow())
        answered = await _answer_next(worker, 0.1)  # trial 0, acknowledged by the primary
        await pair.kill("primary")
        await wait_for(lambda: _silent_for(backup, pair.window_s), 10)
        await worker.move(pair.address("backup", "workers"))
        answered += await _answer_next(worker, 0.2)  # trial 1, by the backup
        primary = await pair.start("primary")  # returns: passive, and catches up from the backup
        await pair.settled("backup", 30)
        assert primary.pair.whole and primary.pair.epoch == backup.pair.epoch == 2
        answered += await _answer_next(worker, 0.3)  # trial 2: confirmed by the returned primary
        await pair.kill("backup")  # and back again: the primary's copy is whole, so it may take over
        await wait_for(lambda: _silent_for(primary, pair.window_s), 10)
        await worker.move(pair.address("primary", "workers"))
        assert primary.pair.state.value == "solo" and primary.pair.epoch == 3
        answered += await _answer_next(worker, 0.99)  # trial 3 passes
        task = await done(client, task_id, 20)
        await asyncio.wait_for(follower, 10)
        assert task["winner"]["index"] == 3
        assert [t["metric"] for t in task["trials"][:4]] == [0.1, 0.2, 0.3, 0.99]
        assert all(t["attempt"] == 1 for t in task["trials"][:4]) and len(answered) == 4  # none run twice
        assert seqs == sorted(set(seqs)) and seqs[-1] == task["seq"]  # no repeat, no reordering, to the end
    finally:
        await worker.stop()
        await client.close()


async def _answer_next(worker: ScriptedWorker, metric: float) -> list:
    """Answer the lowest trial the worker runs and wait for its acknowledgement."""
    await wait_for(lambda: _runs_a_trial(worker), 10)
    job, attempt = min((k for k in worker.running if not k[0].endswith(("plan", "save"))),
                       key=lambda k: int(k[0].split("/")[1]))
    worker.result((job, attempt), {"ok": True, "metric": metric})
    await wait_for(lambda: _acked(worker, job), 10)
    return [job]


async def _runs_a_trial(worker: ScriptedWorker) -> bool:
    return any(not k[0].endswith(("plan", "save")) for k in worker.running)


async def test_a_deleted_tasks_blob_leaves_the_passive_brokers_disk_too(pair, tmp_path):
    """Erasure (issue 16) on a pair: the copy applies the rows and unlinks the file, as the serving one does."""
    primary, backup = await pair.start_both()
    client = AsyncClient(pair.both("clients"), timeout_s=5, idle_resnapshot_s=0.3)
    worker = await ScriptedWorker(pair.both("workers").split(",")[0], "w1", slots=2, delay_s=0.05,
                                  answer=metrics_answer(METRICS)).start()
    model = tmp_path / "only-this-task.bin"
    model.write_bytes(os.urandom(4096))
    try:
        task_id = await client.submit({**spec(), "model": {"path": str(model)}})
        sha = (await done(client, task_id))["spec"]["model"]["path"].split(":")[1].split("/")[0]
        await wait_for(lambda: backup.blobs.stored(sha), 10)  # copied before the upload was acknowledged
        await client.delete(task_id)
        assert not primary.blobs.stored(sha)
        await wait_for(lambda: not backup.blobs.stored(sha), 10)
        assert not backup.blobs.path(sha).exists() and backup.store.owners(sha) == []
    finally:
        await worker.stop()
        await client.close()


async def test_a_submit_retried_with_its_id_makes_one_task(broker, client):
    """What a client of a pair does when its SUBMIT's answer was lost in a failover: send it again."""
    raw = prepare_spec(spec())
    raw["recipe"]["file"] = await client.upload(raw["recipe"]["file"])
    first = await client.request(Cmd.SUBMIT, spec=raw, submit_id="a" * 32)
    again = await client.request(Cmd.SUBMIT, spec=raw, submit_id="a" * 32)
    other = await client.request(Cmd.SUBMIT, spec=raw, submit_id="b" * 32)
    assert first["task_id"] == again["task_id"] != other["task_id"] and len(await client.list()) == 2


async def test_the_gateways_event_stream_and_cluster_view_follow_the_pair(pair, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from nsd.gateway.server import GatewayConfig, GatewayServer

    _, backup = await pair.start_both()
    gateway = GatewayServer(GatewayConfig(broker=pair.both("clients"), http="127.0.0.1:0", grpc=None, keepalive_s=0.5,
                                          no_auth=True))
    await gateway.start()
    for lane in (gateway.client, *gateway.client._lanes):
        lane.timeout_s = 2
    client = AsyncClient(pair.both("clients"), timeout_s=2)
    worker = await ScriptedWorker(pair.address("primary", "workers"), "w1", slots=1, answer=plan_then_hold(4)).start()
    ids: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=gateway.endpoints["http"], timeout=60) as http:
            view = (await http.get("/v1/cluster")).json()
            assert view["pair"]["role"] == "primary" and view["pair"]["peer"]["state"] == "passive"
            task_id = await client.submit(spec())

            async def follow():
                async with http.stream("GET", f"/v1/tasks/{task_id}/events") as answer:
                    async for line in answer.aiter_lines():
                        if line.startswith("id: "):
                            ids.append(int(line[4:]))

            follower = asyncio.create_task(follow())
            await _answer_next(worker, 0.1)
            await pair.kill("primary")
            await wait_for(lambda: _silent_for(backup, pair.window_s), 10)
            await worker.move(pair.address("backup", "workers"))
            await _answer_next(worker, 0.2)
            await _answer_next(worker, 0.99)
            task = await done(client, task_id, 20)
            await asyncio.wait_for(follower, 20)
            assert ids == sorted(set(ids)) and ids[-1] == task["seq"]  # no gap it did not stand in for, no repeat
            view = (await http.get("/v1/cluster")).json()
            assert view["pair"]["role"] == "backup" and view["pair"]["state"] == "solo" and view["pair"]["epoch"] == 2
    finally:
        await worker.stop()
        await client.close()
        await gateway.stop()
