"""Issue 15, attack 5: one token's many event streams on a task with many trials. The gateway follows the
task once (one subscription, one view), reads the whole task again only when its seq moved, keeps other
users' requests answered, gives a slow stream a snapshot instead of a buffer, and caps streams."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from nsd.protocol import Cmd
from tests.conftest import wait_for
from tests.gateway_fixtures import BOB_TOKEN, TOKEN, gateway_config, read_sse
from tests.peers import ScriptedWorker, plan_then_hold, spec

pytest.importorskip("fastapi")
ALICE = {"Authorization": f"Bearer {TOKEN}"}
BOB = {"Authorization": f"Bearer {BOB_TOKEN}"}


def many_trials(n: int) -> dict:
    return spec(config_set=[{"rtn": {"bits": list(range(n))}}], max_trials=n)


@pytest.fixture
async def door(broker, tmp_path):
    from nsd.gateway.server import GatewayServer

    server = GatewayServer(gateway_config(broker, tmp_path, events_probe_s=0.3, max_streams_per_token=150,
                                          max_streams=250))
    await server.start()
    yield server
    await server.stop()


def stay_registered(worker: ScriptedWorker) -> None:
    """Register again if the broker dropped the worker: the test's one loop, busy serving many streams,
    can make the scripted worker miss its heartbeats on a loaded machine."""
    if worker.disconnects:
        worker.disconnects.clear()
        worker.running.clear()
        worker.send(Cmd.READY, {"worker_id": worker.worker_id, "boot_id": "b1", "host": "scripted", "cores": 1,
                                "slots": 1, "version": worker.version, "running": [], "outbox": []})


async def tuning_task(client, broker, n: int) -> tuple[str, ScriptedWorker]:
    """A task of n trials, planned by a scripted worker that holds every trial it is given."""
    worker = await ScriptedWorker(broker.endpoints["workers"], "w-events", answer=plan_then_hold(n)).start()
    task_id = await client.submit(many_trials(n))

    async def planned():
        return (await client.status(task_id))["state"] == "tuning"
    await wait_for(planned, 60)
    return task_id, worker


async def first_event(http, task_id: str, headers: dict, opened: list) -> dict:
    """Open an SSE stream, read its first event (the snapshot) and leave the stream open."""
    context = http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers)
    answer = await context.__aenter__()
    opened.append(context)
    assert answer.status_code == 200, await answer.aread()
    fields = {}
    lines = answer.aiter_lines()
    opened.append(lines)  # held: a dropped line iterator would be closed, and the stream with it
    async for line in lines:
        if line.startswith(":"):
            continue
        if not line and fields:
            return json.loads(fields["data"])
        if not line:
            continue  # the end of a keep-alive comment
        key, _, value = line.partition(": ")
        fields[key] = value
    raise AssertionError("the stream ended before its first event")


async def test_many_streams_share_one_subscription_and_others_stay_served(door, client, broker):
    import httpx

    task_id, worker = await tuning_task(client, broker, 2000)
    opened: list = []
    try:
        async with httpx.AsyncClient(base_url=door.endpoints["http"], timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as http:
            before = door.client.sent.copy()
            snapshots = await asyncio.gather(*(first_event(http, task_id, ALICE, opened) for _ in range(100)))
            assert {len(s["task"]["trials"]) for s in snapshots} == {2000} and len(door.feeds.feeds) == 1
            whole_reads = door.client.sent[Cmd.STATUS, 1000] - before[Cmd.STATUS, 1000]
            assert whole_reads <= 3, whole_reads  # once for all 100 streams (again if an event was missed)
            loop = asyncio.get_running_loop()
            started = loop.time()
            listed = await http.get("/v1/tasks", headers=BOB)  # another user, while the 100 streams are open
            health = await http.get("/healthz")
            print(f"another user's GET and /healthz beside 100 streams: {loop.time() - started:.3f} s")
            assert listed.status_code == 200 and health.json() == {"ok": True}

            # Quiet: the feed asks only for the seq (a page of one trial), never for the whole task again.
            feed = door.feeds.feeds[("alice", task_id)]
            probes, reads, resnapshots = door.client.sent[Cmd.STATUS, 1], door.client.sent[Cmd.STATUS, 1000], feed.resnapshots
            await asyncio.sleep(1.5)
            assert door.client.sent[Cmd.STATUS, 1] > probes  # it asked for the seq ...
            assert feed.resnapshots == resnapshots and door.client.sent[Cmd.STATUS, 1000] == reads  # ... and no more

            # Moving: events reach every stream from the one subscription; still no whole read per stream.
            async def scored():
                stay_registered(worker)
                for key in list(worker.running):  # the lease it holds now
                    worker.result(key, {"ok": True, "metric": 0.5})
                return any(t["state"] == "failed_goal" for t in feed.view["trials"])
            await wait_for(scored, 60, interval=0.5)
            assert door.client.sent[Cmd.STATUS, 1000] <= reads + 1  # a trial event is applied, not re-read per stream
    finally:
        await close_all(opened)
        await worker.stop()
    await wait_for(lambda: _async(not door.feeds.feeds), 30)  # the last stream gone: the feed stops


async def close_all(opened: list) -> None:
    for item in opened:
        await (item.aclose() if hasattr(item, "aclose") else item.__aexit__(None, None, None))


async def _async(value):
    return value


async def test_a_stream_that_reads_too_slowly_catches_up_from_a_shared_snapshot(door, client, broker):
    from nsd.gateway.fanout import QUEUE, SINCE

    task_id, worker = await tuning_task(client, broker, 400)

    async def running_again() -> bool:
        stay_registered(worker)
        return len(worker.running) == 1

    async def finish_trials(n: int) -> None:
        for _ in range(n):
            await wait_for(running_again, 30)
            key = next((t, a) for t, a, job in worker.assigned if job["kind"] == "trial" and (t, a) in worker.running)
            worker.result(key, {"ok": True, "metric": 0.5})

    try:
        with door.feeds.subscribe("alice", "alice", task_id) as slow:
            first = await slow.next()
            assert first["kind"] == "snapshot"
            feed = door.feeds.feeds[("alice", task_id)]
            late: list = []
            with contextlib.ExitStack() as joined:
                for _ in range(20):  # streams join one by one while the task moves
                    late.append(joined.enter_context(door.feeds.subscribe("alice", "alice", task_id)))
                    await late[-1].next()
                    await finish_trials(5)
                # 100 events and 20 joins, at 20 different seqs: snapshots made once per SINCE events
                assert feed.snapshots <= 1 + 100 // SINCE + 1, feed.snapshots
                await finish_trials(QUEUE + SINCE)  # the slow stream, not read meanwhile, falls behind
            await wait_for(lambda: _async(slow.lagging), 30)
            caught_up = [await slow.next()]
            while slow.queue:
                caught_up.append(await slow.next())
            assert caught_up[0]["kind"] == "snapshot" and len(caught_up) <= 1 + SINCE
            seqs = [e["seq"] for e in caught_up]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # then every event, none missing
            assert seqs[-1] == feed.view["seq"] and seqs[-1] > first["seq"] + 200
            assert sum(t["state"] == "failed_goal" for t in caught_up[0]["task"]["trials"]) > 100  # 0.5 < the goal
    finally:
        await worker.stop()


async def test_stream_caps_per_token_and_overall(broker, tmp_path, client):
    import grpc
    import httpx

    from nsd.gateway import nsd_pb2 as pb
    from nsd.gateway import nsd_pb2_grpc
    from nsd.gateway.server import GatewayServer

    server = GatewayServer(gateway_config(broker, tmp_path, max_streams_per_token=2, max_streams=3))
    await server.start()
    task_id = await client.submit(spec())  # no worker: it stays queued, its streams open
    opened: list = []
    try:
        async with httpx.AsyncClient(base_url=server.endpoints["http"], timeout=60, headers=ALICE) as http:
            for _ in range(2):
                await first_event(http, task_id, ALICE, opened)
            third = await http.get(f"/v1/tasks/{task_id}/events", headers=ALICE)
            assert third.status_code == 429 and "this token has 2 event streams open" in third.json()["error"]
            await first_event(http, task_id, BOB, opened)  # bob has his own two ... but the gateway holds 3
            fourth = await http.get(f"/v1/tasks/{task_id}/events", headers=BOB)
            assert fourth.status_code == 429 and "at most 3 event streams" in fourth.json()["error"]
            async with grpc.aio.insecure_channel(server.endpoints["grpc"]) as channel:
                watch = nsd_pb2_grpc.NsdStub(channel).Watch(pb.WatchRequest(task_id=task_id),
                                                            metadata=(("authorization", f"Bearer {TOKEN}"),))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await watch.read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await close_all(opened[:2])  # one of alice's closes: room again
            del opened[:2]
            await wait_for(lambda: _async(server.feeds.streams["alice"] == 1), 30)
            assert [e["kind"] for e in await read_sse(http, task_id, stop_after=1)] == ["snapshot"]
    finally:
        await close_all(opened)
        await server.stop()


async def test_each_tenant_follows_a_task_through_its_own_feed(door, client):
    """A feed reads as its tenant, so two tenants never share one (without CURVE both see the task)."""
    import httpx

    task_id = await client.submit(spec())
    opened: list = []
    try:
        async with httpx.AsyncClient(base_url=door.endpoints["http"], timeout=60) as http:
            await first_event(http, task_id, ALICE, opened)
            await first_event(http, task_id, BOB, opened)
            assert set(door.feeds.feeds) == {("alice", task_id), ("bob", task_id)}
    finally:
        await close_all(opened)


async def test_a_task_that_changes_between_every_page_read_still_gets_its_first_event(door, client, broker):
    """A 2,500-trial task (three pages) whose seq moves between every page the gateway reads: before, the
    feed tried eight times for pages of one seq, gave up, and the stream never got its first event. Now
    the last read keeps the later pages as they come, and the events after the first page's seq bring
    the view to where the broker has it."""
    import httpx

    n = 2500
    worker = await ScriptedWorker(broker.endpoints["workers"], "w-busy", slots=20,
                                  answer=plan_then_hold(n)).start()
    task_id = await client.submit(many_trials(n))
    pool, answered = door.client, []
    real_page = pool.page

    async def holding() -> bool:
        stay_registered(worker)
        return len(worker.running) == 20

    async def page_while_a_trial_ends(task, offset, limit, cmd=Cmd.RESULT_GET):
        if offset > 0 and worker.running:  # a later page of a whole read: end a trial first, and let it land
            seq = (await real_page(task, 0, 0, Cmd.STATUS))["seq"]
            key = worker.running.pop()
            worker.result(key, {"ok": True, "metric": 0.5})
            answered.append(key)
            await wait_for(lambda: _async_seq_moved(real_page, task, seq), 30, interval=0.02)
        return await real_page(task, offset, limit, cmd)

    opened: list = []
    try:
        await wait_for(holding, 60)
        pool.page = page_while_a_trial_ends
        async with httpx.AsyncClient(base_url=door.endpoints["http"], timeout=120) as http:
            snapshot = await asyncio.wait_for(first_event(http, task_id, ALICE, opened), 60)
            assert snapshot["kind"] == "snapshot" and len(snapshot["task"]["trials"]) == n
            # seven reads stopped at their second page (its seq had moved), the eighth kept both later pages
            assert len(answered) == 7 + 2
            pool.page = real_page
            feed = door.feeds.feeds[("alice", task_id)]
            at_broker = await pool.whole(task_id)

            async def converged() -> bool:
                return feed.view["seq"] >= at_broker["seq"]
            await wait_for(converged, 30)
            states = [t["state"] for t in feed.view["trials"]]
            assert states == [t["state"] for t in at_broker["trials"]]
            assert states.count("failed_goal") == len(answered)  # 0.5 misses the goal
    finally:
        pool.page = real_page
        await close_all(opened)
        await worker.stop()


async def _async_seq_moved(page, task_id: str, seq: int) -> bool:
    return (await page(task_id, 0, 0, Cmd.STATUS))["seq"] > seq
