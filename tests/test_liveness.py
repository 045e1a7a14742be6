"""Idle peers heartbeat less (nsd/liveness.py): every `idle_interval` instead of every `heartbeat_s`,
on both sides, while a peer with work in flight keeps the full rate."""

from __future__ import annotations

import asyncio

import pytest

from nsd.liveness import heartbeat_due, idle_interval
from nsd.protocol import Cmd
from tests.conftest import wait_for
from tests.peers import ScriptedWorker, plan_then_hold, spec, trial_job


@pytest.mark.parametrize("liveness, every", [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2), (100, 2)])
def test_an_idle_peer_heartbeats_as_rarely_as_half_the_deadline_window_allows(liveness, every):
    assert idle_interval(2.0, liveness) == 2.0 * every
    # never slower than half the deadline window (or the busy rate, where that is slower already)
    assert idle_interval(2.0, liveness) <= max(2.0, 2.0 * liveness / 2)


def test_busy_peers_heartbeat_every_interval_idle_ones_every_idle_interval():
    assert heartbeat_due(now=11.0, last_sent=10.0, heartbeat_s=1.0, liveness=5, busy=True)
    assert not heartbeat_due(now=11.0, last_sent=10.0, heartbeat_s=1.0, liveness=5, busy=False)
    assert heartbeat_due(now=12.0, last_sent=10.0, heartbeat_s=1.0, liveness=5, busy=False)
    assert not heartbeat_due(now=10.5, last_sent=10.0, heartbeat_s=1.0, liveness=5, busy=True)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


async def test_the_broker_pings_an_idle_worker_every_idle_interval_and_a_busy_one_every_interval(broker, client):
    """The `broker` fixture: 0.5 s × 6, so 1 s between idle pings and 0.5 s while a lease is held."""
    assert idle_interval(broker.heartbeat_s, broker.liveness) == 1.0
    worker = await ScriptedWorker(broker.endpoints["workers"], "w", answer=plan_then_hold(1)).start()
    await asyncio.sleep(4.0)
    idle = list(worker.heartbeats)
    assert 2 <= len(idle) <= 5, gaps(idle)  # at most one a second (every 0.5 s would make 8 or 9)
    task_id = await client.submit(spec())
    await wait_for(lambda: any(a[0] == f"{task_id}/0" for a in worker.assigned), 10)  # held: busy
    start = len(worker.heartbeats)
    await asyncio.sleep(3.0)
    busy = worker.heartbeats[start:]
    assert len(busy) >= 3 and min(gaps(busy)) < 0.8, gaps(busy)
    await worker.stop()


@pytest.mark.slow  # a real worker daemon: its runner processes start
async def test_an_idle_worker_heartbeats_every_other_interval_and_a_busy_one_every_interval(fake_and_worker):  # noqa: F811
    """The fake broker negotiated 1 s × 100: idle, the worker heartbeats every 2 s; holding an
    unacknowledged result, every second."""
    fake, daemon, run = fake_and_worker
    start = len(fake.times)
    await asyncio.sleep(5.0)
    idle = beats(fake, start)
    assert 2 <= len(idle) <= 3, gaps(idle)  # at most one per 2 s (every second would make 5 or 6)
    fake.send(Cmd.ASSIGN, {"trial_id": "abc123abc123/0", "attempt": 1, "job": trial_job()})
    await wait_for(lambda: bool(fake.of(Cmd.RESULT)), 60)  # it fails (no recipe); never acknowledged
    start = len(fake.times)
    await asyncio.sleep(4.0)
    busy = beats(fake, start)
    assert len(busy) >= 3 and min(gaps(busy)) < 1.4, gaps(busy)
    assert daemon.outbox  # still unacknowledged: the reason it counts as busy


def beats(fake, start: int) -> list[float]:
    """When the fake broker received each HEARTBEAT since its `start`-th message."""
    return [t for t, (cmd, _) in zip(fake.times[start:], fake.received[start:]) if cmd is Cmd.HEARTBEAT]
