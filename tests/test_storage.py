"""Storage faults: a state dir that fills up while the broker runs, and one that is read-only at start.

The full disk is a real tmpfs of a few MiB mounted for the test (tests run as root); where `mount` is
refused, the test is skipped with the reason."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nsd.broker.config import BrokerConfig
from nsd.broker.daemon import Broker
from nsd.client.api import AsyncClient, BrokerError
from tests.peers import ScriptedWorker, SPEC, done, metrics_answer

ROOT = Path(__file__).resolve().parent.parent
SHARED = {**SPEC, "model": {"shared": True}}  # paths as they are: nothing to upload


@pytest.fixture
def small_disk(tmp_path):
    def mount(*options: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): this test needs root")
        mounted.append(where)
        return where

    mounted: list[Path] = []
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


async def test_a_full_disk_refuses_writes_keeps_serving_reads_and_recovers(small_disk):
    disk = small_disk("size=4m")
    broker = Broker(BrokerConfig(state_dir=disk / "state", clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*",
                    events="tcp://127.0.0.1:*", heartbeat_s=0.5, liveness=6))
    await broker.start()
    client = AsyncClient(broker.endpoints["clients"], timeout_s=10)
    try:
        first = await client.submit(SHARED)
        filler = _fill(disk)
        refused = 0
        for _ in range(30):
            with pytest.raises(BrokerError, match="broker storage is full") as err:
                await client.submit(SHARED)
            refused += "storage" in str(err.value)
        assert refused == 30
        listed = await client.list()  # reads are still served, and nothing refused was kept
        assert [t["task_id"] for t in listed] == [first] and list(broker.tasks) == [first]
        assert broker.metrics.value("nsd_storage_errors_total") >= 30 and broker.healthy()
        filler.unlink()
        w = await ScriptedWorker(broker.endpoints["workers"], "w", slots=2,
                                 answer=metrics_answer({i: 0.99 for i in range(6)})).start()
        try:
            again = await client.submit(SHARED)
            for task_id in (first, again):
                task = await done(client, task_id, timeout=60)
                assert task["state"] == "done" and task["winner"]["index"] == 0
        finally:
            await w.stop()
    finally:
        await client.close()
        await broker.stop()


def test_a_read_only_state_dir_is_one_line_and_exit_1(small_disk):
    disk = small_disk("size=1m", "ro")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "nsd", "broker", "--state-dir", str(disk / "state"),
                           "--clients", "tcp://127.0.0.1:0", "--workers", "tcp://127.0.0.1:0",
                           "--events", "tcp://127.0.0.1:0"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot use the state dir" in lines[0] and "Read-only" in lines[0], proc.stderr


async def test_the_watchdog_stops_when_the_broker_cannot_serve(broker):
    """systemd restarts a broker that stopped pinging: it pings only while its loops run and SQLite answers."""
    assert broker.healthy()
    broker.store.db.close()  # SQLite gone from under it
    assert not broker.healthy()
    broker.store.db = sqlite3.connect(":memory:")  # (so that stop() can close something)
    broker._loops[0].cancel()
    await asyncio.gather(broker._loops[0], return_exceptions=True)
    assert not broker.healthy()


def test_an_older_state_dirs_events_table_is_dropped(tmp_path):
    """Events were stored until 2026-12 and never read back (clients re-snapshot): the table goes."""
    from nsd.broker.store import Store

    old = sqlite3.connect(tmp_path / "nsd.sqlite3")
    old.execute("CREATE TABLE events (task_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL)")
    old.execute("INSERT INTO events VALUES ('t', 1, '{}')")
    old.commit()
    old.close()
    store = Store(tmp_path / "nsd.sqlite3")
    try:
        tables = {row[0] for row in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "events" not in tables and {"tasks", "trials", "logs", "cache"} <= tables
    finally:
        store.close()
