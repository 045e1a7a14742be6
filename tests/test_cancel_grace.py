"""A cancelled job on a real worker (a fake broker sends ASSIGN, then CANCEL): one that ends within the grace
keeps its runner warm, one that does not has its runner killed; either way its answer is not sent."""

from __future__ import annotations

import asyncio
import os

import pytest

from nsd.protocol import Cmd
from nsd.spec import validate
from nsd.worker import job_flow
from nsd.worker.config import WorkerConfig
from nsd.worker.daemon import WorkerDaemon
from tests.conftest import DIGITS, digits_spec, wait_for
from tests.peers import FakeBroker, trial_job

pytestmark = pytest.mark.slow  # a real worker daemon and its runner


@pytest.fixture
async def slow_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("NSD_TEST_SLOW_S", "1.5")  # each evaluation takes 1.5 s more: the CANCEL finds it running
    fake = FakeBroker()
    config = WorkerConfig(broker=fake.endpoint, cpus=[sorted(os.sched_getaffinity(0))[0]], worker_id="w1",
                          cache_dir=tmp_path / "worker", shared_dirs=[DIGITS], runner_env=["NSD_TEST_SLOW_S"])
    daemon = WorkerDaemon(config)
    run = asyncio.create_task(daemon.run())
    await wait_for(lambda: bool(fake.of(Cmd.READY)), 30)
    fake.send(Cmd.READY_ACK, {"heartbeat_s": 1.0, "liveness": 100})
    await asyncio.wait_for(daemon.registered.wait(), 10)
    (slot,) = daemon.pool.slots
    await slot.runner.ready()
    yield fake, daemon, slot
    daemon.stop(grace_s=0)
    await asyncio.wait_for(run, 30)
    await fake.close()


def digits_job(index: int) -> dict:
    spec = digits_spec()
    spec["model"]["shared"] = True  # read where it lies (a --shared-dir): no transfer in this test
    return trial_job(index=index, spec=validate(spec).to_dict(), config={"rtn": {"bits": 8, "use_layer_wise": False}})


async def cancelled_while_running(fake, daemon, index: int) -> None:
    trial_id = f"abc123abc123/{index}"
    fake.send(Cmd.ASSIGN, {"trial_id": trial_id, "attempt": 1, "job": digits_job(index)})
    await wait_for(lambda: daemon.pool.holding(trial_id, 1) is not None, 10)
    await asyncio.sleep(0.3)
    fake.send(Cmd.CANCEL, {"trial_id": trial_id, "attempt": 1})
    await wait_for(lambda: daemon.pool.holding(trial_id, 1) is None, 60)
    await asyncio.sleep(0.5)  # a RESULT, had one been sent, is here by now
    assert [r for r in fake.of(Cmd.RESULT) if r["trial_id"] == trial_id] == []


async def test_a_cancelled_job_that_ends_within_the_grace_keeps_its_runner(slow_worker, monkeypatch):
    fake, daemon, slot = slow_worker
    monkeypatch.setattr(job_flow, "CANCEL_GRACE_S", 120.0)
    pid = slot.runner.proc.pid
    await cancelled_while_running(fake, daemon, 0)
    assert slot.runner.alive and slot.runner.proc.pid == pid  # the same process: nothing to import again


async def test_a_cancelled_job_past_the_grace_has_its_runner_killed(slow_worker, monkeypatch):
    fake, daemon, slot = slow_worker
    monkeypatch.setattr(job_flow, "CANCEL_GRACE_S", 0.2)
    pid = slot.runner.proc.pid
    await cancelled_while_running(fake, daemon, 1)
    await wait_for(lambda: slot.runner.proc is not None and slot.runner.proc.pid != pid, 30)  # replaced at once
