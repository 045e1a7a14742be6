"""Heartbeats are negotiated: a worker adopts the broker's interval and liveness from READY_ACK, so a
broker with a slower heartbeat than the worker's default does not make idle workers re-register."""

from __future__ import annotations

import asyncio
import os

import pytest

from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.worker.daemon import WorkerConfig, WorkerDaemon

IDLE_S = 30


@pytest.mark.slow
@pytest.mark.parametrize("heartbeat_s", [3.0, 5.0])  # 3: the case; 5: re-registered forever before
async def test_an_idle_default_worker_stays_registered_under_a_slower_broker_heartbeat(tmp_path, heartbeat_s):
    broker = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                    events="tcp://127.0.0.1:*", heartbeat_s=heartbeat_s, liveness=5))
    await broker.start()
    config = WorkerConfig(broker=broker.endpoints["workers"], cpus=[sorted(os.sched_getaffinity(0))[0]],
                          cache_dir=tmp_path / "worker", worker_id="idle")  # default heartbeat and liveness
    worker = WorkerDaemon(config)
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.registered.wait(), 60)
        first = broker.workers["idle"]
        await asyncio.sleep(IDLE_S)
        # Each registration makes a new Worker record: the same one means it never registered again.
        assert broker.workers["idle"] is first and worker.registered.is_set()
        assert (worker.heartbeat_s, worker.liveness) == (heartbeat_s, 5)
    finally:
        worker.stop(grace_s=0)
        await asyncio.wait_for(run, 30)
        await broker.stop()
