"""`nsd run`: a private broker and N workers in this process, one task, then a clean exit.

Endpoints are ipc:// sockets in a fresh temporary folder, so nothing is reachable from outside and
two `nsd run`s never collide. Runner processes are stopped (by PID) before this returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient, prepare_spec
from nsd.worker.daemon import WorkerConfig, WorkerDaemon


def split_cpus(cpus: list[int], n: int) -> list[list[int]]:
    """Disjoint CPU sets for n workers (shared round-robin when there are more workers than CPUs)."""
    if n <= len(cpus):
        per = len(cpus) // n
        return [cpus[i * per:(i + 1) * per] for i in range(n)]
    return [[cpus[i % len(cpus)]] for i in range(n)]


async def run_local(spec: Any, workers: int = 2, on_event: Callable[[dict], None] | None = None,
                    keep_dir: str | None = None) -> dict[str, Any]:
    spec_dict = prepare_spec(spec)
    tmp = Path(keep_dir or tempfile.mkdtemp(prefix="nsd-run-"))
    broker = Broker(tmp / "state", clients=f"ipc://{tmp}/clients", workers=f"ipc://{tmp}/workers",
                    events=f"ipc://{tmp}/events")
    await broker.start()
    daemons: list[WorkerDaemon] = []
    running: list[asyncio.Task] = []
    client = AsyncClient(broker.endpoints["clients"])
    try:
        for i, cpus in enumerate(split_cpus(sorted(os.sched_getaffinity(0)), workers)):
            daemon = WorkerDaemon(WorkerConfig(broker=broker.endpoints["workers"], cpus=cpus,
                                               cores_per_trial=len(cpus), cache_dir=tmp / f"worker{i}",
                                               worker_id=f"local-{i}"))
            daemons.append(daemon)
            running.append(asyncio.create_task(daemon.run()))
        task_id = await client.submit(spec_dict)
        async for event in client.events(task_id):
            if on_event is not None:
                on_event(event)
        return await client.result(task_id)
    finally:
        for daemon in daemons:
            daemon.stop()
        with contextlib.suppress(Exception):
            await asyncio.gather(*running, return_exceptions=True)
        await client.close()
        await broker.stop()
        if keep_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
