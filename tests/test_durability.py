"""Grouped commits keep "What survives what": a result is acknowledged only after the transaction that
holds it commits, so SIGKILL at any moment loses no acknowledged result."""

from __future__ import annotations

import asyncio
import signal
import sqlite3

import zmq

from nsd.client.api import AsyncClient
from tests.conftest import hello_ok, kill_pid, wait_for
from tests.peers import ScriptedWorker, metrics_answer, spec


async def test_no_acknowledged_result_is_lost_when_the_broker_is_killed(broker_process, tmp_path):
    proc, endpoints = broker_process
    await wait_for(lambda: hello_ok(endpoints["clients"]), 30)
    client = AsyncClient(endpoints["clients"], timeout_s=10)
    workers = [await ScriptedWorker(endpoints["workers"], f"w{i}", slots=8,
                                    answer=metrics_answer({i: 0.1 for i in range(400)}, n=400)).start()
               for i in range(3)]
    # Each worker's connection closing: libzmq has then read everything the broker sent before it died.
    closed = [w.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED) for w in workers]
    try:
        task_id = await client.submit(spec(max_trials=400))
        await wait_for(lambda: _acked(workers, 60), 60)  # mid-task, results streaming in
        kill_pid(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await asyncio.wait_for(asyncio.gather(*(monitor.recv_multipart() for monitor in closed)), 30)
        await wait_for(lambda: all(not w.sock.get(zmq.EVENTS) & zmq.POLLIN for w in workers), 30)  # all taken in
        acked = {ack for w in workers for ack in w.acked}
    finally:
        for w, monitor in zip(workers, closed):
            w.sock.disable_monitor()
            monitor.close(linger=0)
            await w.stop()
        await client.close()
    db = sqlite3.connect(tmp_path / "state" / "nsd.sqlite3")
    rows = {f"{task_id}/{idx}": (state, attempt) for idx, state, attempt in
            db.execute("SELECT idx, state, attempt FROM trials WHERE task_id = ?", (task_id,))}
    db.close()
    trial_acks = [(job, attempt) for job, attempt in acked if not job.endswith("/plan")]
    assert len(trial_acks) >= 60
    lost = [(job, attempt) for job, attempt in trial_acks
            if rows.get(job) != ("failed_goal", attempt)]
    assert lost == [], f"{len(lost)} acknowledged results not in the database: {lost[:5]}"


async def _acked(workers, n: int) -> bool:
    return sum(len(w.acked) for w in workers) >= n
