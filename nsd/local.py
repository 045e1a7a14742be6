"""`nsd run`: a private broker and N workers in this process, one task, then a clean exit.

Endpoints are ipc:// sockets in a fresh temporary folder, so nothing is reachable from outside and
two `nsd run`s never collide. Runner processes are stopped (by PID) before this returns. Runners are
sandboxed where bubblewrap works (as for `nsd worker`); where it does not, they run without, with one log
line saying so: this is the user's own code on their own machine (docs/design.md "Runner sandbox").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from nsd.blobs import parse_ref
from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient
from nsd.client.specs import prepare_spec
from nsd.spec import PATH_FIELDS
from nsd.worker.daemon import WorkerConfig, WorkerDaemon
from nsd.worker.sandbox import SandboxError, layout, probe

log = logging.getLogger("nsd.run")


def split_cpus(cpus: list[int], n: int) -> list[list[int]]:
    """Disjoint CPU sets for n workers covering every CPU (sizes differ by at most one; each worker's
    runners are pinned to its own set), or, with more workers than CPUs, one CPU each, shared round-robin."""
    cpus = sorted(cpus)
    if n <= len(cpus):
        per, extra = divmod(len(cpus), n)
        bounds = [i * per + min(i, extra) for i in range(n + 1)]
        return [cpus[bounds[i]:bounds[i + 1]] for i in range(n)]
    return [[cpus[i % len(cpus)]] for i in range(n)]


def shared_folders(spec: dict) -> list[str]:
    """The folders of a model.shared spec's paths: what its runners must read."""
    return [os.path.dirname(spec[a][b]) for a, b in PATH_FIELDS
            if spec["model"].get("shared") and spec[a].get(b) and not parse_ref(spec[a][b])]


def sandbox_works(tmp: Path, shared: list[str] = ()) -> bool:
    """Whether local runners can be sandboxed here; if not, one log line says so."""
    try:
        why = probe(layout(shared, [str(tmp)]), tmp / "probe")
    except SandboxError as exc:
        why = str(exc)
    if why is not None:
        log.warning("runners run without a sandbox (%s): fine for your own recipe on your own machine", why)
    return why is None


def _report_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a local worker stopped: %r", task.exception(), exc_info=task.exception())


async def run_local(spec: Any, workers: int = 2, on_event: Callable[[dict], None] | None = None,
                    keep_dir: str | None = None, output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one task; with `output`, also fetch its quantized model there (as `nsd fetch` does)."""
    spec_dict = prepare_spec(spec)
    tmp = Path(keep_dir or tempfile.mkdtemp(prefix="nsd-run-"))
    broker = Broker(BrokerConfig(state_dir=tmp / "state", clients=f"ipc://{tmp}/clients", workers=f"ipc://{tmp}/workers",
                    events=f"ipc://{tmp}/events"))
    await broker.start()
    daemons: list[WorkerDaemon] = []
    running: list[asyncio.Task] = []
    client = AsyncClient(broker.endpoints["clients"])
    try:
        shared = shared_folders(spec_dict)
        sandbox = sandbox_works(tmp, shared)
        for i, cpus in enumerate(split_cpus(sorted(os.sched_getaffinity(0)), workers)):
            daemon = WorkerDaemon(WorkerConfig(broker=broker.endpoints["workers"], cpus=cpus,
                                               cores_per_trial=len(cpus), cache_dir=tmp / f"worker{i}",
                                               worker_id=f"local-{i}", sandbox=sandbox, shared_dirs=shared))
            daemons.append(daemon)
            running.append(asyncio.create_task(daemon.run()))
            running[-1].add_done_callback(_report_crash)
        task_id = await client.submit(spec_dict)

        async def follow() -> None:
            async for event in client.events(task_id):
                if on_event is not None:
                    on_event(event)

        following = asyncio.create_task(follow())
        while not following.done():  # if every worker has died, nothing will ever finish the task: say so
            await asyncio.wait([following, *running], return_when=asyncio.FIRST_COMPLETED)
            if not following.done() and all(t.done() for t in running):
                following.cancel()
                errors = [t.exception() for t in running if not t.cancelled() and t.exception()]
                raise RuntimeError(f"every local worker stopped before the task ended: {errors[0]!r}"
                                   if errors else "every local worker stopped before the task ended")
        following.result()
        result = await client.result(task_id)
        if output is not None and result.get("artifact"):
            await client.fetch(task_id, output)
        return result
    finally:
        for daemon in daemons:
            daemon.stop(grace_s=0)
        with contextlib.suppress(Exception):
            await asyncio.gather(*running, return_exceptions=True)
        await client.close()
        await broker.stop()
        if keep_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
