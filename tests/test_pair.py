"""A broker pair in this process (issue 20): two real brokers on loopback, scripted workers and real clients.
The copy, acknowledgement only after the passive broker wrote it, Binary Star's takeover rule, fencing by
epoch, a broker that returns, and the link's hostile input. Across hosts: tests/test_pair_netns.py."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from nsd.client.api import AsyncClient
from nsd.protocol import Cmd
from tests.conftest import wait_for
from tests.peers import PairOfBrokers, ScriptedWorker, done, metrics_answer, spec

METRICS = {0: 0.5, 1: 0.95, 2: 0.2, 3: 0.99, 4: 0.99, 5: 0.99}


@pytest.fixture
async def pair(tmp_path):
    brokers = PairOfBrokers(tmp_path)
    yield brokers
    await brokers.close()


def rows(path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_the_primary_serves_and_the_backup_holds_a_row_for_row_copy(pair):
    await pair.start("primary")
    await pair.start("backup")
    await pair.settled("primary")
    client = AsyncClient(pair.both("clients"), timeout_s=5, idle_resnapshot_s=0.3)
    worker = await ScriptedWorker(pair.both("workers").split(",")[0], "w1", slots=2, delay_s=0.05,
                                  answer=metrics_answer(METRICS)).start()
    try:
        task_id = await client.submit(spec())
        assert (await done(client, task_id))["winner"]["index"] == 1
        await wait_for(lambda: _same(pair, "SELECT * FROM trials ORDER BY task_id, idx"), 10)
        assert await _same(pair, "SELECT * FROM tasks") and await _same(pair, "SELECT * FROM events")
        status = await client.request(Cmd.CLUSTER)
        assert status["pair"]["state"] == "active" and status["pair"]["peer"]["state"] == "passive"
    finally:
        await worker.stop()
        await client.close()


async def _same(pair, sql: str) -> bool:
    a = rows(pair.tmp / "primary" / "nsd.sqlite3", sql)
    return bool(a) and a == rows(pair.tmp / "backup" / "nsd.sqlite3", sql)
