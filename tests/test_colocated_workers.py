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
        assert result["state"] == "done", result
        # After the plan, the baseline and the first trial are placed at once, one on each free worker; which
        # worker then takes more trials is a race (a tiny model's trials can all end on one worker while the
        # other's baseline still runs), so "both ran a job" is asserted over the baseline and the trials.
        logs = await client.logs(result["task_id"])
        placed = [log for log in logs if log["job"] not in ("plan", "save", "verify")]
        assert {log["worker"] for log in placed} == {f"w{first}", f"w{second}"}
        for log in logs:
            found = re.search(r"nsd: \w+ job on cpus ([0-9,]+)", log["text"])
            assert found, (log["job"], log["text"][-500:])
            assert found.group(1) == log["worker"][1:], (log["job"], log["worker"], found.group(1))  # w0 on CPU 0 only
    finally:
        for d in daemons:
            d.stop(grace_s=0)
        await asyncio.gather(*running, return_exceptions=True)
