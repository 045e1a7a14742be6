"""A reply over the client's message limit is a clear error, not "is `nsd broker` running?", and a whole
task's logs larger than one message still come back (the broker cuts, the client asks job by job)."""

from __future__ import annotations

import pytest

from nsd.client.api import ReplyTooLarge
from nsd.protocol import MAX_MESSAGE_BYTES, Cmd
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, plan_then_hold, spec

N_JOBS = 100
LOG_TEXT = "\N{GRINNING FACE}" * (64 * 1024)  # a job's log as the broker keeps it: 64 Ki characters, 4 bytes each


async def test_logs_over_the_message_limit(broker, client):
    worker = await ScriptedWorker(broker.endpoints["workers"], "w", answer=plan_then_hold(N_JOBS)).start()
    try:
        task_id = await client.submit(spec(max_trials=N_JOBS))

        async def planned():
            return len((await client.status(task_id))["trials"]) == N_JOBS

        await wait_for(planned, 10)
        with broker.store.tx():  # the logs a long task leaves: 25 MiB in all
            for job in range(N_JOBS):
                broker.store.put_log(task_id, str(job), 1, "w", LOG_TEXT)
        assert N_JOBS * len(LOG_TEXT.encode()) > MAX_MESSAGE_BYTES
        raw = (await client.request(Cmd.LOGS, task_id=task_id))["logs"]  # the broker cuts the oldest to fit
        assert len(raw) == N_JOBS and any(entry.get("cut") for entry in raw)
        logs = await client.logs(task_id)  # the cut ones, job by job
        assert sorted(int(entry["job"]) for entry in logs) == list(range(N_JOBS))
        assert all(entry["text"] == LOG_TEXT for entry in logs)
        assert (await client.logs(task_id, 7))[0]["text"] == LOG_TEXT
        assert (await client.status(task_id))["task_id"] == task_id  # the client goes on as usual
    finally:
        await worker.stop()


async def test_a_reply_over_the_message_limit_is_a_clear_error():
    """A broker peer (a real ROUTER on loopback) answering LOGS with 17 MiB: the client's socket drops
    it (MAXMSGSIZE), and the client says the reply was too large instead of "is `nsd broker` running?",
    then goes on working."""
    import asyncio

    import zmq
    import zmq.asyncio

    from nsd.client.api import AsyncClient
    from nsd.protocol import CLIENT_TO_BROKER, pack, unpack

    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    async def serve():
        while True:
            identity, *frames = await router.recv_multipart()
            msg = unpack(frames, CLIENT_TO_BROKER)
            body = {"req": msg.body["req"], "protocol": 1, "version": "x", "events": "tcp://127.0.0.1:1"}
            if msg.cmd is Cmd.LOGS:
                body["logs"] = [{"job": "0", "text": "x" * (17 * 1024 * 1024)}]
            await router.send_multipart([identity, *pack(Cmd.REPLY, body)])

    server = asyncio.create_task(serve())
    client = AsyncClient(f"tcp://127.0.0.1:{port}", timeout_s=10)
    try:
        with pytest.raises(ReplyTooLarge, match="larger than this client's limit of 16 MiB"):
            await client.request(Cmd.LOGS, task_id="t")
        assert (await client.hello())["protocol"] == 1
    finally:
        await client.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        router.close(linger=0)
        ctx.term()
