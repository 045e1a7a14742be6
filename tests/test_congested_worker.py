"""A burst of ASSIGNs larger than a worker's queue (a worker of many slots taking a wide task at once): the
ones its full queue refused wait for a slot again, on the same attempt, and go out once it reads again.
Before, the broker counted them as running while the worker never had them, and the task stalled."""

from __future__ import annotations

import zmq

from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.broker.limits import BrokerLimits
from nsd.client.api import AsyncClient
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, done, plan_then_hold, spec

SLOTS = 40  # a burst far past the queue: the sends outrun the credit libzmq gives back (~1 ms apart)


async def test_assigns_a_full_queue_refused_go_out_again_once_the_worker_reads(tmp_path):
    broker = Broker(BrokerConfig(state_dir=tmp_path / "state", clients="tcp://127.0.0.1:*",
                                 workers="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*", heartbeat_s=0.5,
                                 liveness=6, limits=BrokerLimits(peer_queue=2)))
    await broker.start()
    client = AsyncClient(broker.endpoints["clients"], timeout_s=10)
    worker = ScriptedWorker(broker.endpoints["workers"], "wide", slots=SLOTS, answer=plan_then_hold(SLOTS))
    worker.sock.setsockopt(zmq.RCVHWM, 1)  # with the broker's 2: room for a few messages, not 40
    try:
        await worker.start()
        task_id = await client.submit(spec(config_set=[{"rtn": {"bits": list(range(SLOTS))}}], max_trials=SLOTS))

        def trials_held() -> list:
            return sorted(key for key in worker.running if not key[0].endswith(("plan", "baseline")))

        async def all_held() -> bool:
            return len(trials_held()) == SLOTS
        await wait_for(all_held, 30)
        assert broker.metrics.value("nsd_dropped_sends_total") > 0  # the burst did overflow the queue
        assert {attempt for _, attempt in trials_held()} == {1}  # taken back, not counted as a lost attempt
        trials = [key for key, attempt, job in worker.assigned if job["kind"] == "trial"]
        assert len(trials) == len(set(trials)) == SLOTS  # each reached the worker exactly once
        for key in trials_held():
            worker.result(key, {"ok": True, "metric": 0.5})
        assert (await done(client, task_id))["state"] == "done"
    finally:
        await worker.stop()
        await client.close()
        await broker.stop()
