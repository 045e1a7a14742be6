"""A reply over the client's message limit is a clear error, not "is `nsd broker` running?", and a whole
task's logs larger than one message still come back (asked for job by job)."""

from __future__ import annotations

import pytest

from nsd.client.api import ReplyTooLarge
from nsd.protocol import MAX_MESSAGE_BYTES, Cmd
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, plan_then_hold
from tests.test_broker import spec

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
        with pytest.raises(ReplyTooLarge, match="answer to LOGS was larger than this client's limit of 16 MiB"):
            await client.request(Cmd.LOGS, task_id=task_id)
        logs = await client.logs(task_id)  # the same, job by job
        assert sorted(int(entry["job"]) for entry in logs) == list(range(N_JOBS))
        assert all(entry["text"] == LOG_TEXT for entry in logs)
        assert (await client.logs(task_id, 7))[0]["text"] == LOG_TEXT
        assert (await client.status(task_id))["task_id"] == task_id  # the client goes on as usual
    finally:
        await worker.stop()
