"""Two workers on one host with disjoint --cpus run their trials on their own cores."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from nsd.worker.cores import select_cpus
from nsd.worker.daemon import WorkerConfig, WorkerDaemon
from tests.conftest import digits_spec

pytestmark = pytest.mark.slow


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
async def test_two_workers_with_disjoint_cpus_run_trials_on_their_own_cores(broker, client, tmp_path):
    first, second = sorted(os.sched_getaffinity(0))[:2]
    daemons = [WorkerDaemon(WorkerConfig(broker=broker.endpoints["workers"], heartbeat_s=0.5,
                                         cpus=select_cpus(sorted(os.sched_getaffinity(0)), cpus=str(cpu)),
                                         cache_dir=tmp_path / f"w{cpu}", worker_id=f"w{cpu}"))
               for cpu in (first, second)]
    running = [asyncio.create_task(d.run()) for d in daemons]
    try:
        await asyncio.wait_for(asyncio.gather(*(d.registered.wait() for d in daemons)), 60)
        spec = digits_spec(cache=False, early_stop=False, tolerable_loss=0.0,
                           config_set=[{"rtn": {"bits": [2, 4, 8], "group_size": [-1, 16], "use_layer_wise": False}}])
        result = await client.result(await client.submit(spec), wait=True)
        ran = [t for t in result["trials"] if t["state"] in ("passed", "failed_goal")]
        assert {t["worker"] for t in ran} == {f"w{first}", f"w{second}"}  # both took trials
        for t in ran:
            (log,) = await client.logs(result["task_id"], t["index"])
            cpus = re.search(r"nsd: trial job on cpus ([0-9,]+)", log["text"]).group(1)
            assert cpus == t["worker"][1:], (t["worker"], cpus)  # w0 ran on CPU 0 only, w1 on CPU 1 only
    finally:
        for d in daemons:
            d.stop(grace_s=0)
        await asyncio.gather(*running, return_exceptions=True)
